//! Affine sessions and request/reply: a session pinned to a worker node, requests to
//! workers and their replies.

use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use bytes::Bytes;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use swarmbus_client::Requests;
use swarmbus_schema::Request;

use crate::delivery::Payload;
use crate::error;
use crate::inbox::{next_item, taken, Inbox};
use crate::session::Client;

/// Where an affine session is pinned: the node, its id in placement, whether the model
/// must be loaded there first (`cold_load`) and whether an earlier pin was kept.
#[pyclass(frozen, get_all, module = "swarmbus._native")]
#[derive(Debug)]
pub struct SessionPinned {
    pub session_key: String,
    pub node: String,
    pub node_id: u64,
    pub cold_load: bool,
    pub kept: bool,
}

/// A worker's answer: `ok` False means the worker failed the request (`payload` says why).
#[pyclass(frozen, get_all, module = "swarmbus._native")]
#[derive(Debug)]
pub struct WorkerReply {
    pub ok: bool,
    /// The node that answered.
    pub node: Option<String>,
    pub payload: Payload,
}

/// A request the router routed to this worker: answer it with `reply(request_id, ...)`
/// within `timeout_ms`.
#[pyclass(frozen, get_all, module = "swarmbus._native")]
#[derive(Debug)]
pub struct WorkerRequest {
    pub request_id: u64,
    pub session_key: Option<String>,
    pub model: Option<String>,
    pub timeout_ms: u32,
    /// The requesting agent.
    pub source_agent: Option<String>,
    pub payload: Payload,
}

impl From<Request> for WorkerRequest {
    fn from(request: Request) -> Self {
        WorkerRequest {
            request_id: request.request_id,
            session_key: request.session_key,
            model: request.model,
            timeout_ms: request.timeout_ms,
            source_agent: request.source_agent,
            payload: Payload::from(request.payload),
        }
    }
}

/// The requests of a worker session as an asynchronous iterator; it ends with the
/// session's connection.
#[pyclass(frozen, module = "swarmbus._native")]
#[derive(Debug)]
pub struct RequestStream {
    requests: Arc<Inbox<Requests>>,
}

#[pymethods]
impl RequestStream {
    fn __aiter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        next_item(py, &self.requests, |py, request| {
            Ok(Py::new(py, WorkerRequest::from(request))?.into_any())
        })
    }
}

/// The session's request stream, taken from the client on first use.
#[derive(Debug, Default)]
pub struct RequestSlot {
    requests: StdMutex<Option<Arc<Inbox<Requests>>>>,
}

#[pymethods]
impl Client {
    /// Opens (or renews) an affine session: the router pins `session_key` to a worker node
    /// (preferring one with `model` loaded) and keeps the pin until the session is closed
    /// or unused for its TTL.
    #[pyo3(signature = (session_key, model = None))]
    fn open_session<'py>(
        &self,
        py: Python<'py>,
        session_key: String,
        model: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let client = self.inner.clone();
        crate::bridge::spawn(py, async move {
            let pinned = client
                .open_session(&session_key, model.as_deref())
                .await
                .map_err(error)?;
            Ok(SessionPinned {
                session_key: pinned.session_key,
                node: pinned.node,
                node_id: pinned.node_id,
                cold_load: pinned.cold_load,
                kept: pinned.kept,
            })
        })
    }

    /// Ends an affine session.
    fn close_session<'py>(
        &self,
        py: Python<'py>,
        session_key: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let client = self.inner.clone();
        crate::bridge::spawn(py, async move {
            client.close_session(&session_key).await.map_err(error)
        })
    }

    /// Sends `payload` to a worker and waits for its reply: with `session_key` to the
    /// session's pinned node, without one to the least-loaded node that has `model`.
    /// Refused with NodeGone, DeadlineExceeded (no reply within `timeout_ms`), NoWorker or
    /// Busy; a worker's own failure is a reply with `ok` False.
    #[pyo3(signature = (payload, *, session_key = None, model = None, timeout_ms = 30_000))]
    fn request_worker<'py>(
        &self,
        py: Python<'py>,
        payload: &[u8],
        session_key: Option<String>,
        model: Option<String>,
        timeout_ms: u64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (client, payload) = (self.inner.clone(), Bytes::copy_from_slice(payload));
        crate::bridge::spawn(py, async move {
            let reply = client
                .request_worker(
                    session_key.as_deref(),
                    model.as_deref(),
                    payload,
                    Duration::from_millis(timeout_ms.max(1)),
                )
                .await
                .map_err(error)?;
            Ok(WorkerReply {
                ok: reply.ok,
                node: reply.node,
                payload: Payload::from(reply.payload),
            })
        })
    }

    /// `async for request in client.requests()` (workers): the requests routed here.
    fn requests(&self) -> PyResult<RequestStream> {
        let requests = taken(&self.affinity.requests, || self.inner.requests())
            .ok_or_else(|| PyValueError::new_err("the requests were taken already"))?;
        Ok(RequestStream { requests })
    }

    /// Answers request `request_id`: `ok` False reports a failure, `payload` why.
    #[pyo3(signature = (request_id, ok, payload = b"".as_slice()))]
    fn reply<'py>(
        &self,
        py: Python<'py>,
        request_id: u64,
        ok: bool,
        payload: &[u8],
    ) -> PyResult<Bound<'py, PyAny>> {
        let (client, payload) = (self.inner.clone(), Bytes::copy_from_slice(payload));
        crate::bridge::spawn(py, async move {
            client.reply(request_id, ok, payload).await.map_err(error)
        })
    }
}
