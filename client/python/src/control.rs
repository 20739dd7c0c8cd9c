//! The control plane: fenced leases, presence, configuration and pause/resume, and the
//! receivers' `FencingFilter`.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use pyo3::prelude::*;
use swarmbus_schema::Member;

use crate::delivery::{Delivery, Payload};
use crate::error;
use crate::session::Client;

/// A lease held: its fencing token is larger than every token granted for the lease
/// before (across router restarts too). Times are the router's clock, Unix ms.
#[pyclass(frozen, get_all, skip_from_py_object, module = "swarmbus._native")]
#[derive(Debug, Clone)]
pub struct LeaseGrant {
    pub swarm: String,
    pub name: String,
    pub holder: String,
    pub token: u64,
    pub granted_at_ms: u64,
    pub expires_at_ms: u64,
}

impl From<swarmbus_schema::LeaseGrant> for LeaseGrant {
    fn from(grant: swarmbus_schema::LeaseGrant) -> Self {
        LeaseGrant {
            swarm: grant.swarm,
            name: grant.name,
            holder: grant.holder,
            token: grant.token,
            granted_at_ms: grant.granted_at_ms,
            expires_at_ms: grant.expires_at_ms,
        }
    }
}

impl LeaseGrant {
    fn to_wire(&self) -> swarmbus_schema::LeaseGrant {
        swarmbus_schema::LeaseGrant {
            request_id: 0,
            swarm: self.swarm.clone(),
            name: self.name.clone(),
            holder: self.holder.clone(),
            token: self.token,
            granted_at_ms: self.granted_at_ms,
            expires_at_ms: self.expires_at_ms,
        }
    }
}

#[pymethods]
impl LeaseGrant {
    fn __repr__(&self) -> String {
        format!(
            "LeaseGrant(swarm={:?}, name={:?}, holder={:?}, token={}, expires_at_ms={})",
            self.swarm, self.name, self.holder, self.token, self.expires_at_ms
        )
    }
}

/// An agent present in a swarm: its role, the router-clock time of its last heartbeat
/// (Unix ms) and the metadata it registered.
#[pyclass(frozen, get_all, module = "swarmbus._native")]
#[derive(Debug)]
pub struct PresenceMember {
    pub agent: String,
    pub role: &'static str,
    pub last_seen_ms: u64,
    pub metadata: String,
}

impl From<Member> for PresenceMember {
    fn from(member: Member) -> Self {
        PresenceMember {
            agent: member.agent,
            role: member.role.name(),
            last_seen_ms: member.last_seen_ms,
            metadata: member.metadata,
        }
    }
}

fn ttl(ttl_ms: u64) -> Duration {
    Duration::from_millis(ttl_ms)
}

#[pymethods]
impl Client {
    /// Acquires lease `name` of `swarm` for `ttl_ms`. Refused with `SwarmbusError` code 27
    /// (LeaseHeld, `retry_after_ms`: the holder's time left) while another holds it; the
    /// holder asking again gets its grant extended, same token.
    fn acquire_lease<'py>(
        &self,
        py: Python<'py>,
        swarm: String,
        name: String,
        ttl_ms: u64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let client = self.inner.clone();
        crate::bridge::spawn(py, async move {
            let grant = client
                .acquire_lease(&swarm, &name, ttl(ttl_ms))
                .await
                .map_err(error)?;
            Ok(LeaseGrant::from(grant))
        })
    }

    /// Renews a held lease for `ttl_ms` from now; code 28 (LeaseLost) once it expired or a
    /// newer token was granted: stop acting as the holder then.
    fn renew_lease<'py>(
        &self,
        py: Python<'py>,
        grant: &LeaseGrant,
        ttl_ms: u64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (client, grant) = (self.inner.clone(), grant.to_wire());
        crate::bridge::spawn(py, async move {
            let renewed = client
                .renew_lease(&grant, ttl(ttl_ms))
                .await
                .map_err(error)?;
            Ok(LeaseGrant::from(renewed))
        })
    }

    /// Gives a held lease up before its TTL runs out.
    fn release_lease<'py>(
        &self,
        py: Python<'py>,
        grant: &LeaseGrant,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (client, grant) = (self.inner.clone(), grant.to_wire());
        crate::bridge::spawn(py, async move {
            client.release_lease(&grant).await.map_err(error)
        })
    }

    /// Every agent present in `swarm`.
    fn presence<'py>(&self, py: Python<'py>, swarm: String) -> PyResult<Bound<'py, PyAny>> {
        let client = self.inner.clone();
        crate::bridge::spawn(py, async move {
            let members = client.presence(&swarm).await.map_err(error)?;
            Ok(members
                .into_iter()
                .map(PresenceMember::from)
                .collect::<Vec<_>>())
        })
    }

    /// Sets entry `name` of `swarm`'s configuration (controllers only; empty removes it);
    /// returns the op id, the configuration's new version.
    fn set_config<'py>(
        &self,
        py: Python<'py>,
        swarm: String,
        name: String,
        value: &[u8],
    ) -> PyResult<Bound<'py, PyAny>> {
        let (client, value) = (self.inner.clone(), Bytes::copy_from_slice(value));
        crate::bridge::spawn(py, async move {
            let op = client
                .set_config(&swarm, &name, value)
                .await
                .map_err(error)?;
            Ok(op.0)
        })
    }

    /// Pauses `swarm`'s commands (a controller's safety action): they are held, not
    /// delivered, until `resume`.
    fn pause<'py>(&self, py: Python<'py>, swarm: String) -> PyResult<Bound<'py, PyAny>> {
        let client = self.inner.clone();
        crate::bridge::spawn(py, async move { client.pause(&swarm).await.map_err(error) })
    }

    /// Ends a pause: every command subscriber catches up, in op order.
    fn resume<'py>(&self, py: Python<'py>, swarm: String) -> PyResult<Bound<'py, PyAny>> {
        let client = self.inner.clone();
        crate::bridge::spawn(
            py,
            async move { client.resume(&swarm).await.map_err(error) },
        )
    }
    /// Disconnects `agent` (its sessions closed with code 36, Stopped) and refuses it for
    /// `for_ms` (controllers only).
    fn stop_agent<'py>(
        &self,
        py: Python<'py>,
        agent: String,
        for_ms: u64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let client = self.inner.clone();
        crate::bridge::spawn(py, async move {
            client
                .stop_agent(&agent, Duration::from_millis(for_ms))
                .await
                .map_err(error)
        })
    }

    /// Drains worker node `node` (no new sessions or jobs; its sessions move), or with
    /// `draining` False takes it back (controllers only).
    #[pyo3(signature = (node, draining = true))]
    fn drain_node<'py>(
        &self,
        py: Python<'py>,
        node: String,
        draining: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let client = self.inner.clone();
        crate::bridge::spawn(py, async move {
            client.drain_node(&node, draining).await.map_err(error)
        })
    }

    /// Hands the router a new credential for this session before the old one expires.
    fn refresh_credential<'py>(
        &self,
        py: Python<'py>,
        token: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let client = self.inner.clone();
        crate::bridge::spawn(py, async move {
            client.refresh_credential(&token).await.map_err(error)
        })
    }
}

/// Drops commands stamped with a fencing token older than one already seen for the same
/// swarm and lease: what a deposed leader sent after its successor took over. Keep
/// `newest(swarm, lease)` with the offsets and give it back with `admit_token` after a
/// restart.
#[pyclass(frozen, module = "swarmbus._native")]
#[derive(Debug, Default)]
pub struct FencingFilter {
    state: Mutex<swarmbus_client::FencingFilter>,
}

impl FencingFilter {
    fn state(&self) -> std::sync::MutexGuard<'_, swarmbus_client::FencingFilter> {
        crate::lock(&self.state)
    }
}

#[pymethods]
impl FencingFilter {
    #[new]
    fn new() -> Self {
        FencingFilter::default()
    }

    /// Whether `delivery` may be acted on (unstamped ones always may); records its token
    /// when it is the newest.
    fn admit(&self, delivery: &Delivery) -> bool {
        self.state().admit(&delivery.deliver)
    }

    /// The same for a token seen elsewhere (a grant, a saved state).
    fn admit_token(&self, swarm: &str, lease: &str, token: u64) -> bool {
        self.state().admit_token(swarm, lease, token)
    }

    /// The newest token seen for `lease` of `swarm` (0: none).
    fn newest(&self, swarm: &str, lease: &str) -> u64 {
        self.state().newest(swarm, lease)
    }

    /// Commands dropped so far.
    fn rejected(&self) -> u64 {
        self.state().rejected()
    }
}

/// A swarm's configuration document as its control deliveries build it: `apply` each
/// control delivery; `get(name)`, `entries()` and `version` read it.
#[pyclass(frozen, module = "swarmbus._native")]
#[derive(Debug)]
pub struct ConfigView {
    view: Mutex<swarmbus_client::ConfigView>,
}

impl ConfigView {
    fn view(&self) -> std::sync::MutexGuard<'_, swarmbus_client::ConfigView> {
        crate::lock(&self.view)
    }
}

#[pymethods]
impl ConfigView {
    #[new]
    fn new(swarm: String) -> Self {
        ConfigView {
            view: Mutex::new(swarmbus_client::ConfigView::new(swarm)),
        }
    }

    /// Applies `delivery` if it is a newer configuration op of this swarm; whether it
    /// changed the document.
    fn apply(&self, delivery: &Delivery) -> bool {
        self.view().apply(&delivery.deliver)
    }

    /// Entry `name`, or None.
    fn get(&self, name: &str) -> Option<Payload> {
        self.view().get(name).cloned().map(Payload::from)
    }

    /// Every entry, by name.
    fn entries(&self) -> Vec<(String, Payload)> {
        self.view()
            .entries()
            .map(|(name, value)| (name.to_owned(), Payload::from(value.clone())))
            .collect()
    }

    /// The op id of the newest configuration op applied (0: none).
    #[getter]
    fn version(&self) -> u64 {
        self.view().version().0
    }
}
