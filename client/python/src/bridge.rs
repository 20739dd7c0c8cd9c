//! Rust futures as asyncio futures, on the package's tokio runtime.
//!
//! `pyo3-async-runtimes` provides the runtime and the same bridge (`future_into_py`), but
//! its tasks touch Python after the awaiting coroutine got its result (while they hand it
//! over, `call_soon_threadsafe` lets the GIL go), so a program that exits right after its
//! last `await` could have the interpreter finalize under a tokio thread still in Python:
//! a crash at exit. Here every task counts itself until it has left Python, and an
//! `atexit` hook (`_quiesce`) waits for the count to reach 0 before the interpreter goes.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::IntoPyObjectExt;

/// Tasks that may still enter or be inside Python.
static IN_PYTHON: AtomicUsize = AtomicUsize::new(0);

/// One task counted in `IN_PYTHON` until dropped (done, or aborted by a cancel).
struct Counted;

impl Counted {
    fn new() -> Self {
        IN_PYTHON.fetch_add(1, Ordering::SeqCst);
        Counted
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        IN_PYTHON.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs `work` on the runtime; returns an asyncio future of the running loop that it
/// resolves. Cancelling that future aborts `work` (a receive gives its place back).
pub(crate) fn spawn<'py, F, T>(py: Python<'py>, work: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    let event_loop = pyo3_async_runtimes::get_running_loop(py)?;
    let future = event_loop.call_method0("create_future")?;
    let target = (event_loop.unbind(), future.clone().unbind());
    let counted = Counted::new();
    let task = pyo3_async_runtimes::tokio::get_runtime().spawn(async move {
        let outcome = work.await;
        Python::attach(|py| hand_over(py, target, outcome));
        drop(counted);
    });
    let canceller = Canceller {
        abort: task.abort_handle(),
    };
    future.call_method1("add_done_callback", (canceller,))?;
    Ok(future)
}

/// Schedules `outcome` onto `future` in its loop's thread. A loop closed meanwhile has
/// nobody waiting: nothing to do.
fn hand_over<T>(py: Python<'_>, (event_loop, future): (Py<PyAny>, Py<PyAny>), outcome: PyResult<T>)
where
    T: for<'a> IntoPyObject<'a>,
{
    let value = outcome.and_then(|value| value.into_bound_py_any(py).map(Bound::unbind));
    let (ok, value) = match value {
        Ok(value) => (true, value),
        Err(error) => (false, error.into_value(py).into_any()),
    };
    if let Ok(settle) = wrap_pyfunction!(settle, py) {
        let _ = event_loop
            .bind(py)
            .call_method1("call_soon_threadsafe", (settle, future, ok, value));
    }
}

/// In the loop's thread: sets the result or the exception, unless the future is done
/// (cancelled) already.
#[pyfunction]
fn settle(future: &Bound<'_, PyAny>, ok: bool, value: Bound<'_, PyAny>) -> PyResult<()> {
    if future.call_method0("done")?.is_truthy()? {
        return Ok(());
    }
    let method = if ok { "set_result" } else { "set_exception" };
    future.call_method1(method, (value,))?;
    Ok(())
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

/// Waits, the GIL released, until no task is in or about to enter Python (at most
/// `timeout_s`). Registered with `atexit` by the package.
#[pyfunction]
pub(crate) fn _quiesce(py: Python<'_>, timeout_s: f64) {
    let deadline = Instant::now() + Duration::from_secs_f64(timeout_s.clamp(0.0, 60.0));
    py.detach(|| {
        while IN_PYTHON.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    });
}
