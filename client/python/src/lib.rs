//! `swarmbus._native`: the Rust client (`swarmbus-client`) for Python, as asyncio.
//!
//! Every coroutine runs on one tokio runtime that the package owns
//! (`pyo3-async-runtimes`); awaiting one parks the Python task on an asyncio future that
//! the runtime completes ([`bridge`]), so nothing polls. The Python package `swarmbus` (in
//! `python/swarmbus/`) re-exports these types with their docs and type stubs.
//!
//! Layout:
//! - [`bridge`]: Rust futures as asyncio futures, and the wait at exit;
//! - this file: the module, the exception and the conversions of names (class, role);
//! - [`session`]: `connect`, `Client` (subscribe, publish, acknowledge, receive);
//! - [`resilient`]: `connect_resilient`, `ResilientClient` (reconnects by itself);
//! - [`inbox`]: a receiver shared by Python receives (what a cancelled one took goes back);
//! - [`delivery`]: `Delivery` and `Payload` (a buffer over the received bytes, no copy);
//! - [`apply`]: `IdempotentApply` with its file offset store;
//! - [`control`]: leases, presence, configuration (`ConfigView`), safety actions,
//!   `FencingFilter`;
//! - [`jobs`]: submitters and workers, `JobDedup`;
//! - [`workers`]: GPU detection and worker registration;
//! - [`affinity`]: affine sessions, requests to workers and their replies.

use pyo3::create_exception;
use pyo3::prelude::*;
use swarmbus_client::{Class, ClientError, Role};

mod affinity;
mod apply;
mod bridge;
mod control;
mod delivery;
mod inbox;
mod jobs;
mod resilient;
mod session;
mod workers;

create_exception!(
    _native,
    SwarmbusError,
    pyo3::exceptions::PyException,
    "A swarmbus error. `code` is the router's stable error code (None for local errors \
     such as a closed connection), `retry_after_ms` how long the router asked to wait, and \
     `is_transient` whether doing the same again later may succeed."
);

/// The Python exception for a client error. Made without the GIL (runtime threads raise
/// it): its code, retry hint and transience travel as arguments, and the bridge turns them
/// into attributes where it raises it.
pub(crate) fn error(error: ClientError) -> PyErr {
    SwarmbusError::new_err((
        error.to_string(),
        error.code(),
        error.retry_after_ms(),
        error.is_transient(),
    ))
}

/// Locks `mutex`, poisoned or not: every state the package keeps under a lock is changed
/// in one step (an insert, a push, a take), so a panic elsewhere cannot leave it half-done.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `"command"` -> `Class::Command`, as the schema names classes.
pub(crate) fn class(name: &str) -> PyResult<Class> {
    name.parse()
        .map_err(pyo3::exceptions::PyValueError::new_err)
}

pub(crate) fn role(name: &str) -> PyResult<Role> {
    match name {
        "agent" => Ok(Role::Agent),
        "controller" => Ok(Role::Controller),
        "worker" => Ok(Role::Worker),
        other => Err(pyo3::exceptions::PyValueError::new_err(format!(
            "unknown role {other:?} (agent, controller, worker)"
        ))),
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("SwarmbusError", m.py().get_type::<SwarmbusError>())?;
    m.add_function(wrap_pyfunction!(session::connect, m)?)?;
    m.add_function(wrap_pyfunction!(bridge::_quiesce, m)?)?;
    m.add_function(wrap_pyfunction!(workers::detect_gpus, m)?)?;
    m.add_class::<workers::Gpu>()?;
    m.add_class::<workers::GpuReport>()?;
    m.add_class::<affinity::SessionPinned>()?;
    m.add_class::<affinity::WorkerReply>()?;
    m.add_class::<affinity::WorkerRequest>()?;
    m.add_class::<affinity::RequestStream>()?;
    m.add_class::<session::Client>()?;
    m.add_function(wrap_pyfunction!(resilient::connect_resilient, m)?)?;
    m.add_class::<resilient::ResilientClient>()?;
    m.add_class::<session::DeliveryStream>()?;
    m.add_class::<delivery::Delivery>()?;
    m.add_class::<delivery::Payload>()?;
    m.add_class::<apply::IdempotentApply>()?;
    m.add_class::<control::LeaseGrant>()?;
    m.add_class::<control::PresenceMember>()?;
    m.add_class::<control::FencingFilter>()?;
    m.add_class::<control::ConfigView>()?;
    m.add_class::<jobs::JobStatus>()?;
    m.add_class::<jobs::JobUpdate>()?;
    m.add_class::<jobs::JobLease>()?;
    m.add_class::<jobs::JobCancel>()?;
    m.add_class::<jobs::JobStream>()?;
    m.add_class::<jobs::JobDedup>()?;
    m.add_class::<jobs::DeadLetter>()?;
    Ok(())
}
