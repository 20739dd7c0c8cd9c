//! `connect` and `Client`: a session with a router, its requests as coroutines, and its
//! deliveries.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use pyo3::exceptions::{PyStopAsyncIteration, PyValueError};
use pyo3::prelude::*;
use swarmbus_client::{Connector, Deliveries, OpId, PublishOptions, Session};
use swarmbus_schema::{Deliver, Publish};

use crate::apply::IdempotentApply;
use crate::delivery::Delivery;
use crate::inbox::Inbox;
use crate::{class, error};

/// Connects to `router` ("host:port") as `agent_id` with `role`, joining `swarms`; with
/// `resume`, the router first sends the ordered ops after what it applied. Trusts the CA
/// certificate in the PEM file `ca` for `server_name`; `credential` is a signed token when
/// the router requires one. Returns a `Client` once the router said Welcome.
#[pyfunction]
#[pyo3(signature = (router, *, ca, agent_id, swarms, role = "agent", credential = None, resume = None, server_name = String::from("localhost")))]
#[allow(clippy::too_many_arguments)] // Python's keyword arguments, one per option
pub fn connect<'py>(
    py: Python<'py>,
    router: String,
    ca: PathBuf,
    agent_id: String,
    swarms: Vec<String>,
    role: &str,
    credential: Option<String>,
    resume: Option<PyRef<'py, IdempotentApply>>,
    server_name: String,
) -> PyResult<Bound<'py, PyAny>> {
    let mut session = Session::new(agent_id, crate::role(role)?, swarms);
    if let Some(token) = credential {
        session = session.with_credential(token);
    }
    if let Some(applied) = resume {
        session = session.resume_from(&applied.snapshot());
    }
    crate::bridge::spawn(py, async move {
        // The connector's endpoint binds its socket on the package's runtime; each of the
        // name's addresses is tried in turn.
        let connector = Connector::new(&ca, &server_name).map_err(error)?;
        let (client, deliveries) = connector
            .connect_to(&router, session)
            .await
            .map_err(error)?;
        Ok(Client {
            inner: client,
            deliveries: Inbox::new(deliveries),
            jobs: crate::jobs::Streams::default(),
            affinity: crate::affinity::RequestSlot::default(),
        })
    })
}

/// A session with a router. Its methods are coroutines; deliveries come from `recv`,
/// `recv_batch` or `async for delivery in client.deliveries()`.
#[pyclass(frozen, module = "swarmbus._native")]
#[derive(Debug)]
pub struct Client {
    pub(crate) inner: swarmbus_client::Client,
    /// One receiver: concurrent receives take turns.
    deliveries: Arc<Inbox<Deliveries>>,
    /// The job streams, taken from the client on first use.
    pub(crate) jobs: crate::jobs::Streams,
    /// The requests to this worker, taken on first use.
    pub(crate) affinity: crate::affinity::RequestSlot,
}

#[pymethods]
impl Client {
    /// The agent id this session speaks for.
    #[getter]
    fn agent_id(&self) -> String {
        self.inner.agent_id().to_owned()
    }

    /// Subscribes to `cls` messages of `swarm` (from every agent, or `from_agent` only);
    /// returns once the router registered it.
    #[pyo3(signature = (swarm, cls, from_agent = None))]
    fn subscribe<'py>(
        &self,
        py: Python<'py>,
        swarm: String,
        cls: &str,
        from_agent: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let class = class(cls)?;
        let client = self.inner.clone();
        crate::bridge::spawn(py, async move {
            client
                .subscribe(&swarm, class, from_agent.as_deref())
                .await
                .map_err(error)
        })
    }

    /// Publishes `payload` to `swarm` as `cls`. Ordered classes (control, command) return
    /// the op id once the op is durable; the others return None once queued.
    #[pyo3(signature = (swarm, cls, payload, *, target_agent = None, key = None, fencing_token = 0, lease = None))]
    #[allow(clippy::too_many_arguments)] // Python's keyword arguments, one per option
    fn publish<'py>(
        &self,
        py: Python<'py>,
        swarm: String,
        cls: &str,
        payload: &[u8],
        target_agent: Option<String>,
        key: Option<String>,
        fencing_token: u64,
        lease: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let class = class(cls)?;
        let options = PublishOptions {
            target_agent,
            key,
            fencing_token,
            lease,
            ..PublishOptions::default()
        };
        // The one copy on the way out: the message outlives this call, the Python object
        // need not.
        let payload = Bytes::copy_from_slice(payload);
        let client = self.inner.clone();
        crate::bridge::spawn(py, async move {
            let op = client
                .publish(&swarm, class, payload, options)
                .await
                .map_err(error)?;
            Ok((op != OpId::NONE).then_some(op.0))
        })
    }

    /// Publishes several payloads of an ordered class to `swarm`, all in flight at once
    /// (within the session's `max_in_flight`), in order; returns their op ids once all are
    /// durable. One hand-over for many publishes: the way to publish fast from Python. As
    /// all are in flight at once, an error (the first refusal) says nothing of the others:
    /// any of them may be durable, and publishing them again may apply them twice.
    fn publish_many<'py>(
        &self,
        py: Python<'py>,
        swarm: String,
        cls: &str,
        payloads: Vec<Vec<u8>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let class = class(cls)?;
        if !class.is_ordered() {
            return Err(PyValueError::new_err(
                "publish_many is for ordered classes (control, command); publish_batch \
                 queues unordered ones",
            ));
        }
        let client = self.inner.clone();
        crate::bridge::spawn(py, async move {
            let mut pending = Vec::with_capacity(payloads.len());
            for payload in payloads {
                let options = PublishOptions::default();
                let started = client.publish_start(&swarm, class, Bytes::from(payload), options);
                pending.push(started.await.map_err(error)?);
            }
            let mut ops = Vec::with_capacity(pending.len());
            for ack in pending {
                ops.push(ack.wait().await.map_err(error)?.0);
            }
            Ok(ops)
        })
    }

    /// Queues several payloads of an unordered class to `swarm` in as few writes as the
    /// stream allows; returns how many were queued.
    fn publish_batch<'py>(
        &self,
        py: Python<'py>,
        swarm: String,
        cls: &str,
        payloads: Vec<Vec<u8>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let class = class(cls)?;
        let messages: Vec<Publish> = payloads
            .into_iter()
            .map(|payload| Publish {
                request_id: 0,
                swarm: swarm.clone(),
                class,
                target_agent: None,
                key: None,
                payload: Bytes::from(payload),
                fencing_token: 0,
                lease: None,
            })
            .collect();
        let client = self.inner.clone();
        crate::bridge::spawn(py, async move {
            client.publish_batch(class, messages).await.map_err(error)
        })
    }

    /// Tells the router every op of `cls` in `swarm` up to `op_id` was applied.
    fn ack<'py>(
        &self,
        py: Python<'py>,
        swarm: String,
        cls: &str,
        op_id: u64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let class = class(cls)?;
        let client = self.inner.clone();
        crate::bridge::spawn(py, async move {
            client.ack(&swarm, class, OpId(op_id)).await.map_err(error)
        })
    }

    /// The next delivery (highest-priority class first), or None once the session ended.
    fn recv<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        receive(py, &self.deliveries, 1, Shape::FirstOrNone)
    }

    /// Up to `limit` deliveries (waiting for the first): one hand-over to Python for many
    /// messages. Empty once the session ended.
    #[pyo3(signature = (limit = 256))]
    fn recv_batch<'py>(&self, py: Python<'py>, limit: usize) -> PyResult<Bound<'py, PyAny>> {
        receive(py, &self.deliveries, limit, Shape::All)
    }

    /// `async for delivery in client.deliveries()`: every delivery until the session ends.
    fn deliveries(&self) -> DeliveryStream {
        DeliveryStream {
            deliveries: self.deliveries.clone(),
        }
    }

    /// Closes the session (its connection, with a goodbye to the router).
    fn close(&self) {
        self.inner.close();
    }
}

/// The deliveries of a session as an asynchronous iterator; it ends with the session.
#[pyclass(frozen, module = "swarmbus._native")]
#[derive(Debug)]
pub struct DeliveryStream {
    deliveries: Arc<Inbox<Deliveries>>,
}

impl DeliveryStream {
    pub(crate) fn new(deliveries: Arc<Inbox<Deliveries>>) -> Self {
        DeliveryStream { deliveries }
    }
}

#[pymethods]
impl DeliveryStream {
    fn __aiter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        receive(py, &self.deliveries, 1, Shape::FirstOrStop)
    }
}

/// Deliveries as Python gets them: the first (None once ended), the first (the end of
/// the iteration once ended), or all of them.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Shape {
    FirstOrNone,
    FirstOrStop,
    All,
}

impl Shape {
    fn convert(self) -> fn(Python<'_>, Vec<Deliver>) -> PyResult<Py<PyAny>> {
        match self {
            Shape::FirstOrNone => first_or_none,
            Shape::FirstOrStop => first_or_stop,
            Shape::All => all,
        }
    }
}

fn first_or_none(py: Python<'_>, ready: Vec<Deliver>) -> PyResult<Py<PyAny>> {
    match ready.into_iter().next() {
        Some(delivery) => Ok(Py::new(py, Delivery::from(delivery))?.into_any()),
        None => Ok(py.None()),
    }
}

fn first_or_stop(py: Python<'_>, ready: Vec<Deliver>) -> PyResult<Py<PyAny>> {
    match ready.into_iter().next() {
        Some(delivery) => Ok(Py::new(py, Delivery::from(delivery))?.into_any()),
        None => Err(PyStopAsyncIteration::new_err(())),
    }
}

fn all(py: Python<'_>, ready: Vec<Deliver>) -> PyResult<Py<PyAny>> {
    let deliveries: Vec<Delivery> = ready.into_iter().map(Delivery::from).collect();
    Ok(deliveries.into_pyobject(py)?.into_any().unbind())
}

/// A receive of up to `limit` deliveries: answered on the spot when some are there, else
/// by the runtime; what a cancelled receive took goes back to the inbox.
pub(crate) fn receive<'py>(
    py: Python<'py>,
    inbox: &Arc<Inbox<Deliveries>>,
    limit: usize,
    shape: Shape,
) -> PyResult<Bound<'py, PyAny>> {
    if limit == 0 {
        return Err(PyValueError::new_err("limit must be at least 1"));
    }
    // The loop first: without one, nothing may be taken from the inbox.
    let event_loop = pyo3_async_runtimes::get_running_loop(py)?;
    if let Some(ready) = inbox.ready_now(limit) {
        let future = event_loop.call_method0("create_future")?;
        match shape.convert()(py, ready) {
            Ok(value) => future.call_method1("set_result", (value,))?,
            Err(error) => future.call_method1("set_exception", (error.into_value(py),))?,
        };
        return Ok(future);
    }
    let (taker, giver) = (inbox.clone(), inbox.clone());
    crate::bridge::spawn_with(
        py,
        async move { Ok(taker.next(limit).await) },
        shape.convert(),
        Some(Box::new(move |taken: Vec<Deliver>| giver.give_back(taken))),
    )
}
