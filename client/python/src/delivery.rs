//! `Delivery` and its `Payload`: what a subscriber receives, without copying the bytes.

use std::ffi::{c_int, c_void};

use bytes::Bytes;
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use swarmbus_schema::Deliver;

/// One message delivered to this session.
#[pyclass(frozen, module = "swarmbus._native")]
#[derive(Debug)]
pub struct Delivery {
    pub(crate) deliver: Deliver,
}

impl From<Deliver> for Delivery {
    fn from(deliver: Deliver) -> Self {
        Delivery { deliver }
    }
}

#[pymethods]
impl Delivery {
    #[getter]
    fn swarm(&self) -> &str {
        &self.deliver.swarm
    }

    /// The class's name: control, command, alert, reconciliation or telemetry.
    #[getter]
    fn cls(&self) -> &'static str {
        self.deliver.class.name()
    }

    /// The op id of an ordered class (0 for the others).
    #[getter]
    fn op_id(&self) -> u64 {
        self.deliver.op_id.0
    }

    /// The epoch of the swarm's log (0 for unordered classes).
    #[getter]
    fn epoch(&self) -> u64 {
        self.deliver.epoch.0
    }

    #[getter]
    fn source_agent(&self) -> &str {
        &self.deliver.source_agent
    }

    #[getter]
    fn target_agent(&self) -> Option<&str> {
        self.deliver.target_agent.as_deref()
    }

    #[getter]
    fn key(&self) -> Option<&str> {
        self.deliver.key.as_deref()
    }

    /// The publisher's fencing token (0: none) and its lease.
    #[getter]
    fn fencing_token(&self) -> u64 {
        self.deliver.fencing_token
    }

    #[getter]
    fn lease(&self) -> Option<&str> {
        self.deliver.lease.as_deref()
    }

    /// When the router took the publish, Unix microseconds on its host (0: unknown).
    #[getter]
    fn published_us(&self) -> u64 {
        self.deliver.published_us
    }

    /// The payload, as a read-only buffer over the bytes received (`memoryview(p)` reads
    /// them in place; `bytes(p)` copies).
    #[getter]
    fn payload(&self) -> Payload {
        Payload {
            bytes: self.deliver.payload.clone(),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "Delivery(swarm={:?}, cls={:?}, op_id={}, source_agent={:?}, {} bytes)",
            self.deliver.swarm,
            self.deliver.class.name(),
            self.deliver.op_id.0,
            self.deliver.source_agent,
            self.deliver.payload.len()
        )
    }
}

/// A payload's bytes, shared with the client (a reference count, no copy): it exports the
/// buffer protocol, read-only.
#[pyclass(frozen, skip_from_py_object, module = "swarmbus._native")]
#[derive(Debug, Clone)]
pub struct Payload {
    bytes: Bytes,
}

impl From<Bytes> for Payload {
    fn from(bytes: Bytes) -> Self {
        Payload { bytes }
    }
}

#[pymethods]
impl Payload {
    fn __len__(&self) -> usize {
        self.bytes.len()
    }

    fn __bytes__(&self) -> Vec<u8> {
        self.bytes.to_vec()
    }

    // The buffer protocol is an FFI contract with no safe wrapper in PyO3: the view points
    // into `bytes`, which lives as long as this object, and `PyBuffer_FillInfo` takes a
    // reference to the object for the view's lifetime; the bytes never change (frozen).
    #[allow(unsafe_code)]
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("no view to fill"));
        }
        if flags & ffi::PyBUF_WRITABLE == ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err("a payload is read-only"));
        }
        let bytes = &slf.get().bytes;
        let filled = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                bytes.as_ptr() as *mut c_void,
                bytes.len() as ffi::Py_ssize_t,
                1,
                flags,
            )
        };
        if filled == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    #[allow(unsafe_code)]
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}
