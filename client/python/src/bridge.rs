//! Rust futures as asyncio futures, on the package's tokio runtime.
//!
//! `pyo3-async-runtimes` provides the runtime and a bridge (`future_into_py`); this one
//! differs in three ways:
//! - Everything Python is done in the event loop's thread: a task hands its Rust outcome
//!   over (`call_soon_threadsafe`) and the loop's thread converts it and resolves the
//!   future. So a result is never made for a future that was cancelled meanwhile: a
//!   receive hands its deliveries back (`give_back`) instead of dropping them.
//! - Every entry of a runtime thread into Python goes through [`attach`], which an exit
//!   closes: `_quiesce` (an `atexit` hook) shuts the gate and waits for the threads inside
//!   to leave, so the interpreter never finalizes under one (on Python before 3.13 PyO3
//!   cannot refuse that itself).
//! - Cancelling the asyncio future aborts the Rust work.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::IntoPyObjectExt;

use crate::SwarmbusError;

/// Set by `_quiesce`: runtime threads no longer enter Python.
static CLOSED: AtomicBool = AtomicBool::new(false);
/// Runtime threads inside [`attach`] (or about to check the gate).
static ENTERING: AtomicUsize = AtomicUsize::new(0);

/// Runs `f` with the GIL from a runtime thread, unless the interpreter is exiting.
pub(crate) fn attach<R>(f: impl FnOnce(Python<'_>) -> R) -> Option<R> {
    ENTERING.fetch_add(1, Ordering::SeqCst);
    let result = if CLOSED.load(Ordering::SeqCst) {
        None
    } else {
        Some(Python::attach(f))
    };
    ENTERING.fetch_sub(1, Ordering::SeqCst);
    result
}

/// How an outcome becomes a Python object, in the loop's thread.
type ToPython<T> = fn(Python<'_>, T) -> PyResult<Py<PyAny>>;
/// What to do with an outcome whose future was cancelled before it arrived.
type GiveBack<T> = Box<dyn FnOnce(T) + Send>;

/// Runs `work` on the runtime; returns an asyncio future of the running loop that it
/// resolves.
pub(crate) fn spawn<'py, F, T>(py: Python<'py>, work: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    spawn_with(
        py,
        work,
        |py, value| Ok(value.into_bound_py_any(py)?.unbind()),
        None,
    )
}

/// Like [`spawn`], converting with `to_python`; an outcome that arrives for a cancelled
/// future goes to `give_back`.
pub(crate) fn spawn_with<'py, F, T>(
    py: Python<'py>,
    work: F,
    to_python: ToPython<T>,
    give_back: Option<GiveBack<T>>,
) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: Send + 'static,
{
    let event_loop = pyo3_async_runtimes::get_running_loop(py)?;
    let future = event_loop.call_method0("create_future")?;
    let target = (event_loop.unbind(), future.clone().unbind());
    let task = pyo3_async_runtimes::tokio::get_runtime().spawn(async move {
        let outcome = work.await;
        let settle = Settle {
            run: Mutex::new(Some(Box::new(move |py, future| {
                resolve(py, future, outcome, to_python, give_back)
            }))),
        };
        let (event_loop, future) = target;
        attach(move |py| {
            let _ = event_loop
                .bind(py)
                .call_method1("call_soon_threadsafe", (settle, future));
        });
    });
    let canceller = Canceller {
        abort: task.abort_handle(),
    };
    future.call_method1("add_done_callback", (canceller,))?;
    Ok(future)
}

/// In the loop's thread: the outcome onto `future`, or back to `give_back` if the future
/// is done (cancelled) already.
fn resolve<T>(
    py: Python<'_>,
    future: &Bound<'_, PyAny>,
    outcome: PyResult<T>,
    to_python: ToPython<T>,
    give_back: Option<GiveBack<T>>,
) -> PyResult<()> {
    if future.call_method0("done")?.is_truthy()? {
        if let (Ok(value), Some(give_back)) = (outcome, give_back) {
            give_back(value);
        }
        return Ok(());
    }
    match outcome.and_then(|value| to_python(py, value)) {
        Ok(value) => future.call_method1("set_result", (value,))?,
        Err(error) => future.call_method1("set_exception", (exception(py, error),))?,
    };
    Ok(())
}

/// The exception object of `error`. A `SwarmbusError` is made without the GIL (see
/// `crate::error`) with its fields as arguments; here they become attributes.
fn exception(py: Python<'_>, error: PyErr) -> Py<PyAny> {
    let value = error.into_value(py).into_bound(py).into_any();
    if value.is_instance_of::<SwarmbusError>() {
        if let Ok((message, code, retry_after_ms, is_transient)) = value
            .getattr("args")
            .and_then(|args| args.extract::<(String, Option<u64>, u32, bool)>())
        {
            // Plain attributes of a fresh exception object: only memory exhaustion could
            // make these fail, and the exception is still raised, without them.
            let _ = value.setattr("code", code);
            let _ = value.setattr("retry_after_ms", retry_after_ms);
            let _ = value.setattr("is_transient", is_transient);
            let _ = value.setattr("args", (message,));
        }
    }
    value.unbind()
}

type Run = Box<dyn FnOnce(Python<'_>, &Bound<'_, PyAny>) -> PyResult<()> + Send>;

/// Called in the loop's thread with the future (once).
#[pyclass(frozen, module = "swarmbus._native")]
struct Settle {
    run: Mutex<Option<Run>>,
}

impl std::fmt::Debug for Settle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Settle")
    }
}

#[pymethods]
impl Settle {
    fn __call__(&self, py: Python<'_>, future: &Bound<'_, PyAny>) -> PyResult<()> {
        let run = crate::lock(&self.run).take();
        match run {
            Some(run) => run(py, future),
            None => Ok(()),
        }
    }
}

/// The future's done callback: a cancel aborts the Rust work.
#[pyclass(frozen, module = "swarmbus._native")]
#[derive(Debug)]
struct Canceller {
    abort: tokio::task::AbortHandle,
}

#[pymethods]
impl Canceller {
    fn __call__(&self, future: &Bound<'_, PyAny>) -> PyResult<()> {
        if future.call_method0("cancelled")?.is_truthy()? {
            self.abort.abort();
        }
        Ok(())
    }
}

/// Shuts the gate of [`attach`] and waits, the GIL released, until no runtime thread is
/// inside (at most `timeout_s`). Registered with `atexit` by the package.
#[pyfunction]
pub(crate) fn _quiesce(py: Python<'_>, timeout_s: f64) {
    CLOSED.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs_f64(timeout_s.clamp(0.0, 60.0));
    py.detach(|| {
        while ENTERING.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    });
}
