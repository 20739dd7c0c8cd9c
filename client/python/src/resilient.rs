//! `connect_resilient` and `ResilientClient`: a session that reconnects by itself.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use swarmbus_client::{
    Connector, Deliveries, OpId, PublishOptions, ReconnectOptions, RetryPolicy, Session,
};

use crate::apply::IdempotentApply;
use crate::inbox::Inbox;
use crate::session::{receive, DeliveryStream, Shape};
use crate::{class, error};

/// Like `connect`, and the session comes back by itself after the router or the network
/// went away: it reconnects (waits from `base_ms` doubling to `cap_ms`, with full jitter,
/// without end), subscribes again to what it subscribed to, and resumes each ordered class
/// after the last op it handed over, so deliveries go on, nothing lost or doubled at the
/// seam. `router` is `host:port`, or several separated by commas (routers of one cluster:
/// a failed attempt moves to the next, a lost connection resumes on the next), each looked
/// up once: its first IPv4 address (else its first address) is used for every attempt.
#[pyfunction]
#[pyo3(signature = (router, *, ca, agent_id, swarms, role = "agent", credential = None, resume = None, server_name = String::from("localhost"), base_ms = 500, cap_ms = 10_000))]
#[allow(clippy::too_many_arguments)] // Python's keyword arguments, one per option
pub fn connect_resilient<'py>(
    py: Python<'py>,
    router: String,
    ca: PathBuf,
    agent_id: String,
    swarms: Vec<String>,
    role: &str,
    credential: Option<String>,
    resume: Option<PyRef<'py, IdempotentApply>>,
    server_name: String,
    base_ms: u64,
    cap_ms: u64,
) -> PyResult<Bound<'py, PyAny>> {
    let mut session = Session::new(agent_id, crate::role(role)?, swarms);
    if let Some(token) = credential {
        session = session.with_credential(token);
    }
    if let Some(applied) = resume {
        session = session.resume_from(&applied.snapshot());
    }
    let options = ReconnectOptions {
        policy: RetryPolicy {
            base: Duration::from_millis(base_ms.max(1)),
            cap: Duration::from_millis(cap_ms.max(base_ms.max(1))),
            max_attempts: u32::MAX,
            jitter: true,
        },
        ..ReconnectOptions::default()
    };
    crate::bridge::spawn(py, async move {
        let mut routers = Vec::new();
        for name in router.split(',').map(str::trim) {
            if name.is_empty() {
                return Err(PyValueError::new_err(format!(
                    "router {router:?}: an empty name in the list"
                )));
            }
            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host(name)
                .await
                .map_err(|e| {
                    error(swarmbus_client::ClientError::Connect {
                        router: name.to_owned(),
                        detail: format!("looking up the name: {e}"),
                    })
                })?
                .collect();
            // localhost's ::1 often comes first, and routers listen on 127.0.0.1 by default.
            let addr = addrs
                .iter()
                .find(|a| a.is_ipv4())
                .or(addrs.first())
                .copied()
                .ok_or_else(|| PyValueError::new_err(format!("router {name:?}: no address")))?;
            routers.push(addr);
        }
        let connector = Connector::new(&ca, &server_name).map_err(error)?;
        let (client, deliveries) = connector
            .connect_resilient_cluster(&routers, session, options)
            .await
            .map_err(error)?;
        Ok(ResilientClient {
            inner: client,
            deliveries: Inbox::new(deliveries),
        })
    })
}

/// A session that reconnects by itself (see `connect_resilient`). Its receives go on
/// across reconnects.
#[pyclass(frozen, module = "swarmbus._native")]
#[derive(Debug)]
pub struct ResilientClient {
    inner: swarmbus_client::ResilientClient,
    deliveries: Arc<Inbox<Deliveries>>,
}

#[pymethods]
impl ResilientClient {
    /// Subscribes, now and after every reconnect.
    #[pyo3(signature = (swarm, cls, from_agent = None))]
    fn subscribe<'py>(
        &self,
        py: Python<'py>,
        swarm: String,
        cls: &str,
        from_agent: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (class, client) = (class(cls)?, self.inner.clone());
        crate::bridge::spawn(py, async move {
            client
                .subscribe(&swarm, class, from_agent.as_deref())
                .await
                .map_err(error)
        })
    }

    /// Publishes on the current connection (waiting for one while reconnecting); ordered
    /// classes return the op id once durable. A publish cut off by a lost connection
    /// raises: it may or may not have been sequenced.
    fn publish<'py>(
        &self,
        py: Python<'py>,
        swarm: String,
        cls: &str,
        payload: &[u8],
    ) -> PyResult<Bound<'py, PyAny>> {
        let (class, client) = (class(cls)?, self.inner.clone());
        let payload = Bytes::copy_from_slice(payload);
        crate::bridge::spawn(py, async move {
            let op = client
                .publish(&swarm, class, payload, PublishOptions::default())
                .await
                .map_err(error)?;
            Ok((op != OpId::NONE).then_some(op.0))
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
        let (class, client) = (class(cls)?, self.inner.clone());
        crate::bridge::spawn(py, async move {
            client.ack(&swarm, class, OpId(op_id)).await.map_err(error)
        })
    }

    /// The next delivery, across reconnects; None once closed.
    fn recv<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        receive(py, &self.deliveries, 1, Shape::FirstOrNone)
    }

    /// Up to `limit` deliveries (waiting for the first); empty once closed.
    #[pyo3(signature = (limit = 256))]
    fn recv_batch<'py>(&self, py: Python<'py>, limit: usize) -> PyResult<Bound<'py, PyAny>> {
        receive(py, &self.deliveries, limit, Shape::All)
    }

    /// `async for delivery in client.deliveries()`, across reconnects.
    fn deliveries(&self) -> DeliveryStream {
        DeliveryStream::new(self.deliveries.clone())
    }

    /// Connections made again since the first.
    #[getter]
    fn reconnects(&self) -> u64 {
        self.inner.reconnects()
    }

    /// Closes the session for good (no more reconnects).
    fn close(&self) {
        self.inner.close();
    }
}
