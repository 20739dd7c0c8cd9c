//! `IdempotentApply`: each ordered op applied once, across redeliveries and restarts.

use std::sync::Mutex;

use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use swarmbus_client::FileOffsetStore;

use crate::class;
use crate::delivery::Delivery;

/// Drops redeliveries: admits an ordered op only above the last one applied of its swarm
/// and class (and restarts in a new epoch). With `path`, its state is kept in that file
/// (`FileOffsetStore`: replaced atomically) by `save`, and read back when created.
#[pyclass(frozen, module = "swarmbus._native")]
#[derive(Debug)]
pub struct IdempotentApply {
    state: Mutex<swarmbus_client::IdempotentApply>,
    store: Option<FileOffsetStore>,
}

impl IdempotentApply {
    fn state(&self) -> std::sync::MutexGuard<'_, swarmbus_client::IdempotentApply> {
        crate::lock(&self.state)
    }

    /// A copy of the state, for a session's resume points.
    pub(crate) fn snapshot(&self) -> swarmbus_client::IdempotentApply {
        self.state().clone()
    }
}

#[pymethods]
impl IdempotentApply {
    #[new]
    #[pyo3(signature = (path = None))]
    fn new(path: Option<std::path::PathBuf>) -> PyResult<Self> {
        let store = path.map(FileOffsetStore::new);
        let state = match &store {
            Some(store) => swarmbus_client::IdempotentApply::load(store)
                .map_err(|e| PyOSError::new_err(format!("{}: {e}", store.path().display())))?,
            None => swarmbus_client::IdempotentApply::new(),
        };
        Ok(IdempotentApply {
            state: Mutex::new(state),
            store,
        })
    }

    /// Whether `delivery` should be applied (and records it when so): False for a
    /// redelivery of an op at or below the last one applied.
    fn admit(&self, delivery: &Delivery) -> bool {
        let d = &delivery.deliver;
        self.state().admit(&d.swarm, d.class, d.epoch, d.op_id)
    }

    /// The last op applied of `cls` in `swarm` (0: none).
    fn last_applied(&self, swarm: &str, cls: &str) -> PyResult<u64> {
        Ok(self.state().last_applied_of(swarm, class(cls)?).0)
    }

    /// Writes the state to the file given at creation (no file: nothing to do).
    fn save(&self) -> PyResult<()> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let state = self.snapshot();
        state
            .save(store)
            .map_err(|e| PyOSError::new_err(format!("{}: {e}", store.path().display())))
    }

    /// How many (swarm, ordered class) it tracks.
    fn __len__(&self) -> usize {
        self.state().state().count()
    }
}
