//! Workers: GPU detection and registration with the router's placement.

use pyo3::prelude::*;
use swarmbus_client::gpu::{self, GpuInfo};

use crate::error;
use crate::session::Client;

/// One GPU of this node, as NVML reports it.
#[pyclass(frozen, get_all, module = "swarmbus._native")]
#[derive(Debug)]
pub struct Gpu {
    /// The driver's index (the order of `nvidia-smi`).
    pub index: u32,
    pub model: String,
    /// Stable across reboots and re-indexing: name a GPU by it outside this node.
    pub uuid: String,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
}

impl From<&GpuInfo> for Gpu {
    fn from(info: &GpuInfo) -> Self {
        Gpu {
            index: info.index,
            model: info.model.clone(),
            uuid: info.uuid.clone(),
            memory_total_bytes: info.memory_total_bytes,
            memory_free_bytes: info.memory_free_bytes,
        }
    }
}

/// What GPU detection found: `gpus` (empty when none, or when it could not look), the
/// probe that answered (`source`; "none" in a build without NVML) and, when `gpus` is
/// empty, why (`note`). It never raises.
#[pyclass(frozen, get_all, module = "swarmbus._native")]
#[derive(Debug)]
pub struct GpuReport {
    pub gpus: Vec<Py<Gpu>>,
    pub source: &'static str,
    pub note: Option<String>,
}

/// This node's GPUs, through NVML (loaded at run time: a node without the NVIDIA driver
/// gets an empty report with its reason).
#[pyfunction]
pub fn detect_gpus(py: Python<'_>) -> PyResult<GpuReport> {
    // NVML's probe can take a while on a busy node: the GIL is not held meanwhile.
    let report = py.detach(gpu::detect);
    let gpus = report
        .gpus
        .iter()
        .map(|info| Py::new(py, Gpu::from(info)))
        .collect::<PyResult<_>>()?;
    Ok(GpuReport {
        gpus,
        source: report.source,
        note: report.note,
    })
}

#[pymethods]
impl Client {
    /// Registers this session's node as a worker (role "worker"), or restates what it
    /// advertises: call it again when a model is loaded or evicted, load changes, or to
    /// start draining. With `detect` the GPU fields come from `detect_gpus()` (run off the
    /// event loop); without it they are sent empty (the router replaces the node's whole
    /// status). Returns the node's id in placement.
    #[pyo3(signature = (node, *, zone = String::new(), models = Vec::new(), adapters = Vec::new(), weight = 0, in_flight = 0, draining = false, detect = true))]
    #[allow(clippy::too_many_arguments)] // Python's keyword arguments, one per field
    fn register_worker<'py>(
        &self,
        py: Python<'py>,
        node: String,
        zone: String,
        models: Vec<String>,
        adapters: Vec<String>,
        weight: u32,
        in_flight: u32,
        draining: bool,
        detect: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let client = self.inner.clone();
        crate::bridge::spawn(py, async move {
            // NVML's start-up can take a second or more: on a blocking thread, not the
            // event loop's.
            let mut status = if detect {
                let report = tokio::task::spawn_blocking(gpu::detect)
                    .await
                    .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))?;
                report.worker_status(&node)
            } else {
                swarmbus_client::WorkerStatus {
                    node,
                    ..swarmbus_client::WorkerStatus::default()
                }
            };
            status.zone = zone;
            status.models = models;
            status.adapters = adapters;
            status.weight = weight;
            status.in_flight = in_flight;
            status.draining = draining;
            client.register_worker(status).await.map_err(error)
        })
    }
}
