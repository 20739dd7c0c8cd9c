//! GPU detection for worker nodes: what a worker advertises about its GPUs.
//!
//! A [`GpuProbe`] lists the node's GPUs ([`GpuInfo`]); [`detect_with`] turns one probe's
//! answer into a [`GpuReport`] that never fails: a probe error becomes an empty report whose
//! `note` says why, logged with `tracing::warn!`. [`detect`] does that with the probe this
//! build has:
//! - with the cargo feature `nvml`: `NvmlProbe`, NVIDIA's management library
//!   (`libnvidia-ml.so.1`, loaded at run time through `nvml-wrapper`, so building needs no
//!   NVIDIA software and a node without it reports no GPUs instead of failing to start);
//! - without it: no probe; the report is empty and says the feature is off.
//!
//! [`FakeGpus`] answers with a fixed list or error: for tests, and for running a worker on a
//! machine without GPUs as if it had some. [`GpuReport::to_affinity`] gives the placement
//! library's summary of the node ([`swarmbus_affinity::Gpus`]).
//!
//! ```
//! use swarmbus_client::gpu::{detect_with, FakeGpus};
//! let report = detect_with(&FakeGpus::identical(2, "NVIDIA H100 80GB HBM3", 80 << 30));
//! assert_eq!(report.gpus.len(), 2);
//! assert_eq!(report.to_affinity().count, 2);
//! ```

use std::sync::atomic::{AtomicBool, Ordering};

use thiserror::Error;

/// One GPU as the probe saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    /// The driver's index of the GPU (0-based; the order of `nvidia-smi`, not necessarily
    /// that of `CUDA_VISIBLE_DEVICES`).
    pub index: u32,
    /// Product name, e.g. "NVIDIA H100 80GB HBM3".
    pub model: String,
    /// The GPU's globally unique id, e.g. "GPU-5b7e...": stable across reboots and
    /// re-indexing, so use it, not `index`, to name a GPU outside this node.
    pub uuid: String,
    /// Installed memory, in bytes.
    pub memory_total_bytes: u64,
    /// Memory not allocated at probe time, in bytes.
    pub memory_free_bytes: u64,
    /// Percent of the last sample period (1/6 s to 1 s, by product) during which a kernel
    /// ran. `None` where the GPU does not say (MIG mode, some virtual GPUs).
    pub utilization_percent: Option<u32>,
}

/// Why a probe found no GPUs.
///
/// A second error type in this crate (beside [`crate::ClientError`]) on purpose: it never
/// comes from a session, and [`detect`] turns it into a note rather than returning it, so
/// folding it into `ClientError` would only make every session error match arm longer.
///
/// `LibraryMissing`, `DriverNotLoaded` and `NoPermission` describe the node's set-up: they
/// last until someone installs or starts the driver or changes permissions (or runs the
/// container with the GPUs passed in). `Driver` and `Device` may be transient (a GPU being
/// reset); probing again later may succeed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GpuError {
    /// The NVIDIA management library (`libnvidia-ml.so.1`) could not be loaded: no NVIDIA
    /// driver on this node, or a container started without the GPUs passed in.
    #[error("the NVIDIA management library (libnvidia-ml.so.1) could not be loaded: {detail}")]
    LibraryMissing { detail: String },
    /// The library loaded but the kernel driver is not running.
    #[error("the NVIDIA driver is not loaded: {detail}")]
    DriverNotLoaded { detail: String },
    /// The library may not talk to the driver (device node permissions).
    #[error("no permission to talk to the NVIDIA driver: {detail}")]
    NoPermission { detail: String },
    /// Any other error of the management library or the driver (version mismatch, ...).
    #[error("NVIDIA driver error: {detail}")]
    Driver { detail: String },
    /// A query on one GPU failed (it fell off the bus, needs a reset, ...). The probe
    /// reports no GPUs rather than a partial list, so the node's inventory is never wrong
    /// in a way nobody sees: the note names the GPU.
    #[error("querying GPU {index}: {detail}")]
    Device { index: u32, detail: String },
}

/// A source of the node's GPU list.
pub trait GpuProbe: Send + Sync {
    /// The GPUs now, or why they cannot be listed. Must not panic.
    fn probe(&self) -> Result<Vec<GpuInfo>, GpuError>;
    /// A short name for reports and logs ("nvml", "fake").
    fn name(&self) -> &'static str;
}

/// The outcome of a detection: always usable, possibly empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuReport {
    /// The GPUs found, in index order; empty when none were found or the probe failed.
    pub gpus: Vec<GpuInfo>,
    /// The probe that answered ([`GpuProbe::name`]), or "none" when this build has no probe.
    pub source: &'static str,
    /// Why `gpus` is empty (probe error, feature off, none present); `None` when GPUs were
    /// found.
    pub note: Option<String>,
    /// The probe's error, for callers that act on its kind; `None` when the probe succeeded
    /// (or none ran).
    pub error: Option<GpuError>,
}

/// The `source` of a report made without any probe.
pub const NO_PROBE: &str = "none";

impl GpuReport {
    /// The node's GPUs as placement sees them: the count, the model (the GPUs' common
    /// product name, or their distinct names joined by ", " in index order when they differ),
    /// and memory summed over all GPUs (saturating).
    pub fn to_affinity(&self) -> swarmbus_affinity::Gpus {
        self.affinity_gpus()
    }

    /// A worker's status with the GPU fields filled from this report (what
    /// [`crate::Client::register_worker`] sends): set `models`, `zone` and the rest.
    pub fn worker_status(&self, node: &str) -> swarmbus_schema::WorkerStatus {
        let gpus = self.affinity_gpus();
        swarmbus_schema::WorkerStatus {
            node: node.to_owned(),
            gpu_count: gpus.count,
            gpu_model: gpus.model,
            gpu_memory_total: gpus.memory_total_bytes,
            gpu_memory_free: gpus.memory_free_bytes,
            ..swarmbus_schema::WorkerStatus::default()
        }
    }

    fn affinity_gpus(&self) -> swarmbus_affinity::Gpus {
        let mut models: Vec<&str> = Vec::new();
        for gpu in &self.gpus {
            if !models.contains(&gpu.model.as_str()) {
                models.push(&gpu.model);
            }
        }
        swarmbus_affinity::Gpus {
            count: u32::try_from(self.gpus.len()).unwrap_or(u32::MAX),
            model: models.join(", "),
            memory_total_bytes: self
                .gpus
                .iter()
                .fold(0u64, |sum, gpu| sum.saturating_add(gpu.memory_total_bytes)),
            memory_free_bytes: self
                .gpus
                .iter()
                .fold(0u64, |sum, gpu| sum.saturating_add(gpu.memory_free_bytes)),
        }
    }
}

/// Asks `probe` and turns its answer into a report. A failing probe gives an empty report
/// whose `note` and `error` say why, and a `warn!` each call: callers that poll should
/// keep the first report's note or use [`detect`], which warns once per process.
pub fn detect_with(probe: &dyn GpuProbe) -> GpuReport {
    report_from(probe, &AtomicBool::new(false))
}

/// Set once [`detect`] has warned, so a worker re-probing at every heartbeat logs the
/// reason once and then at `debug`.
static DETECT_WARNED: AtomicBool = AtomicBool::new(false);

/// The probe [`detect`] uses: one per process, so NVML is initialised once (by the first
/// successful probe) however often a worker detects.
#[cfg(feature = "nvml")]
static DETECT_PROBE: NvmlProbe = NvmlProbe::new();

/// Detects this node's GPUs with the probe this build has: NVML with the `nvml` feature
/// (one `NvmlProbe` for the process), none without it. Never fails: see
/// [`GpuReport::note`]. Warns once per process about a failed probe (or the missing
/// feature).
pub fn detect() -> GpuReport {
    #[cfg(feature = "nvml")]
    {
        report_from(&DETECT_PROBE, &DETECT_WARNED)
    }
    #[cfg(not(feature = "nvml"))]
    {
        let note = "built without the `nvml` feature: GPU detection is off (rebuild \
                    swarmbus-client with `--features nvml` on GPU nodes)";
        warn_once(&DETECT_WARNED, note);
        GpuReport {
            gpus: Vec::new(),
            source: NO_PROBE,
            note: Some(note.to_owned()),
            error: None,
        }
    }
}

fn report_from(probe: &dyn GpuProbe, warned: &AtomicBool) -> GpuReport {
    let source = probe.name();
    match probe.probe() {
        Ok(mut gpus) => {
            gpus.sort_by_key(|gpu| gpu.index);
            let note = gpus
                .is_empty()
                .then(|| format!("{source} reports no GPUs on this node"));
            if let Some(note) = &note {
                tracing::info!(source, "{note}");
            }
            GpuReport {
                gpus,
                source,
                note,
                error: None,
            }
        }
        Err(error) => {
            let note = format!("no GPUs reported: {source} failed: {error}");
            warn_once(warned, &note);
            GpuReport {
                gpus: Vec::new(),
                source,
                note: Some(note),
                error: Some(error),
            }
        }
    }
}

fn warn_once(warned: &AtomicBool, note: &str) {
    if warned.swap(true, Ordering::Relaxed) {
        tracing::debug!("{note}");
    } else {
        tracing::warn!("{note}");
    }
}

/// A probe with a fixed answer: a list of GPUs, or an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeGpus {
    answer: Result<Vec<GpuInfo>, GpuError>,
}

impl FakeGpus {
    /// Answers with `gpus`.
    pub fn new(gpus: Vec<GpuInfo>) -> Self {
        FakeGpus { answer: Ok(gpus) }
    }

    /// Answers with no GPUs (a CPU-only node).
    pub fn none() -> Self {
        Self::new(Vec::new())
    }

    /// Answers with `count` idle GPUs of one model, each with `memory_bytes` installed and
    /// free, and uuids `GPU-fake-0`, `GPU-fake-1`, ...
    pub fn identical(count: u32, model: &str, memory_bytes: u64) -> Self {
        Self::new(
            (0..count)
                .map(|index| GpuInfo {
                    index,
                    model: model.to_owned(),
                    uuid: format!("GPU-fake-{index}"),
                    memory_total_bytes: memory_bytes,
                    memory_free_bytes: memory_bytes,
                    utilization_percent: Some(0),
                })
                .collect(),
        )
    }

    /// Fails every probe with `error`.
    pub fn failing(error: GpuError) -> Self {
        FakeGpus { answer: Err(error) }
    }
}

impl GpuProbe for FakeGpus {
    fn probe(&self) -> Result<Vec<GpuInfo>, GpuError> {
        self.answer.clone()
    }

    fn name(&self) -> &'static str {
        "fake"
    }
}

#[cfg(feature = "nvml")]
pub use nvml::NvmlProbe;

#[cfg(feature = "nvml")]
mod nvml {
    use std::ffi::OsString;
    use std::sync::Mutex;

    use nvml_wrapper::error::NvmlError;
    use nvml_wrapper::Nvml;

    use super::{GpuError, GpuInfo, GpuProbe};

    /// NVIDIA's management library (NVML), through `nvml-wrapper`.
    ///
    /// The library is loaded with `dlopen` at the first probe, not at link time: a binary
    /// built with the `nvml` feature starts on any node, and on one without
    /// `libnvidia-ml.so.1` every probe fails with [`GpuError::LibraryMissing`].
    ///
    /// Initialisation is cached: the first successful `Nvml::init()` is kept (and shut down
    /// when the probe is dropped), because initialising can take a second or more on a node
    /// whose GPUs are not in persistence mode, too slow to repeat at every heartbeat. A
    /// failed initialisation is not cached, so a driver installed or started later is found
    /// by the next probe. Probes through one `NvmlProbe` take turns (a mutex); NVML itself
    /// is thread-safe, the lock only guards the cached handle. [`detect`](super::detect)
    /// keeps one `NvmlProbe` for the whole process.
    ///
    /// Lists physical GPUs: MIG instances are not enumerated, and a GPU in MIG mode reports
    /// no utilisation.
    pub struct NvmlProbe {
        /// `None`: the library's default name, `libnvidia-ml.so.1`, found by the dynamic
        /// loader's search path.
        library: Option<OsString>,
        nvml: Mutex<Option<Nvml>>,
    }

    impl std::fmt::Debug for NvmlProbe {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let initialised = self.nvml.lock().map(|nvml| nvml.is_some()).unwrap_or(false);
            f.debug_struct("NvmlProbe")
                .field("library", &self.library)
                .field("initialised", &initialised)
                .finish()
        }
    }

    impl Default for NvmlProbe {
        fn default() -> Self {
            Self::new()
        }
    }

    impl NvmlProbe {
        /// A probe that loads `libnvidia-ml.so.1` at its first use.
        pub const fn new() -> Self {
            NvmlProbe {
                library: None,
                nvml: Mutex::new(None),
            }
        }

        /// A probe that loads the library at `path` instead (a driver installed outside
        /// the loader's search path). The file is loaded as a shared library, so name only
        /// NVIDIA's.
        pub fn with_library(path: impl Into<OsString>) -> Self {
            NvmlProbe {
                library: Some(path.into()),
                nvml: Mutex::new(None),
            }
        }

        fn init(&self) -> Result<Nvml, GpuError> {
            let mut builder = Nvml::builder();
            if let Some(path) = &self.library {
                builder.lib_path(path);
            }
            builder.init().map_err(init_error)
        }
    }

    impl GpuProbe for NvmlProbe {
        fn probe(&self) -> Result<Vec<GpuInfo>, GpuError> {
            // A panic while the lock was held cannot leave the Option half-written: take the
            // handle as it is.
            let mut cached = self
                .nvml
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let nvml = match &mut *cached {
                Some(nvml) => nvml,
                slot @ None => slot.insert(self.init()?),
            };
            list(nvml)
        }

        fn name(&self) -> &'static str {
            "nvml"
        }
    }

    fn list(nvml: &Nvml) -> Result<Vec<GpuInfo>, GpuError> {
        let count = nvml.device_count().map_err(init_error)?;
        let mut gpus = Vec::with_capacity(count as usize);
        for index in 0..count {
            let device_error = |error: NvmlError| GpuError::Device {
                index,
                detail: error.to_string(),
            };
            let device = nvml.device_by_index(index).map_err(device_error)?;
            let memory = device.memory_info().map_err(device_error)?;
            gpus.push(GpuInfo {
                index,
                model: device.name().map_err(device_error)?,
                uuid: device.uuid().map_err(device_error)?,
                memory_total_bytes: memory.total,
                memory_free_bytes: memory.free,
                // Not supported in MIG mode and on some virtual GPUs: optional.
                utilization_percent: device.utilization_rates().ok().map(|rates| rates.gpu),
            });
        }
        Ok(gpus)
    }

    /// Classifies an error of loading or initialising the library.
    pub(super) fn init_error(error: NvmlError) -> GpuError {
        let detail = error.to_string();
        match error {
            NvmlError::LibloadingError(_) | NvmlError::LibraryNotFound => {
                GpuError::LibraryMissing { detail }
            }
            NvmlError::DriverNotLoaded => GpuError::DriverNotLoaded { detail },
            NvmlError::NoPermission => GpuError::NoPermission { detail },
            _ => GpuError::Driver { detail },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32, model: &str, total: u64, free: u64) -> GpuInfo {
        GpuInfo {
            index,
            model: model.to_owned(),
            uuid: format!("GPU-test-{index}"),
            memory_total_bytes: total,
            memory_free_bytes: free,
            utilization_percent: None,
        }
    }

    #[test]
    fn a_fake_with_two_gpus_gives_both_in_index_order() {
        let fake = FakeGpus::new(vec![
            gpu(1, "NVIDIA H100 80GB HBM3", 80 << 30, 10 << 30),
            gpu(0, "NVIDIA H100 80GB HBM3", 80 << 30, 70 << 30),
        ]);
        let report = detect_with(&fake);
        assert_eq!(report.source, "fake");
        assert_eq!(report.note, None);
        assert_eq!(report.error, None);
        let indexes: Vec<u32> = report.gpus.iter().map(|g| g.index).collect();
        assert_eq!(indexes, [0, 1]);
        assert_eq!(report.gpus[1].memory_free_bytes, 10 << 30);
    }

    #[test]
    fn a_missing_library_gives_an_empty_report_that_says_why() {
        let fake = FakeGpus::failing(GpuError::LibraryMissing {
            detail: "libnvidia-ml.so.1: cannot open shared object file".into(),
        });
        let report = detect_with(&fake);
        assert!(report.gpus.is_empty());
        assert_eq!(report.source, "fake");
        assert!(matches!(
            report.error,
            Some(GpuError::LibraryMissing { .. })
        ));
        let note = report
            .note
            .as_deref()
            .expect("a failed probe leaves a note");
        assert!(note.contains("libnvidia-ml.so.1"), "{note}");
        assert!(note.contains("cannot open shared object file"), "{note}");
        assert_eq!(report.to_affinity(), swarmbus_affinity::Gpus::default());
    }

    #[test]
    fn a_node_without_gpus_gets_a_note_but_no_error() {
        let report = detect_with(&FakeGpus::none());
        assert!(report.gpus.is_empty());
        assert_eq!(report.error, None);
        assert!(report.note.is_some_and(|n| n.contains("no GPUs")));
    }

    #[test]
    fn conversion_to_affinity_counts_and_sums() {
        let report = detect_with(&FakeGpus::identical(8, "NVIDIA H200", 141 << 30));
        let gpus = report.to_affinity();
        assert_eq!(gpus.count, 8);
        assert_eq!(gpus.model, "NVIDIA H200");
        assert_eq!(gpus.memory_total_bytes, 8 * (141 << 30));
        assert_eq!(gpus.memory_free_bytes, 8 * (141 << 30));
        let node = swarmbus_affinity::NodeSpec::new(
            swarmbus_affinity::NodeId(1),
            swarmbus_affinity::Zone::default(),
            gpus,
        );
        assert_eq!(node.weight, 8);
    }

    #[test]
    fn conversion_to_affinity_names_mixed_models_and_saturates() {
        let report = detect_with(&FakeGpus::new(vec![
            gpu(0, "NVIDIA A100-SXM4-80GB", u64::MAX, 1),
            gpu(1, "NVIDIA L4", 1, 2),
            gpu(2, "NVIDIA A100-SXM4-80GB", 1, 3),
        ]));
        let gpus = report.to_affinity();
        assert_eq!(gpus.count, 3);
        assert_eq!(gpus.model, "NVIDIA A100-SXM4-80GB, NVIDIA L4");
        assert_eq!(gpus.memory_total_bytes, u64::MAX);
        assert_eq!(gpus.memory_free_bytes, 6);
    }

    #[test]
    fn detect_never_fails() {
        // Whatever this machine has (no NVIDIA library in CI, or the feature off), detect
        // answers; with GPUs it must say nothing is wrong, without them it must say why.
        let report = detect();
        assert_eq!(report.gpus.is_empty(), report.note.is_some());
        #[cfg(not(feature = "nvml"))]
        {
            assert_eq!(report.source, NO_PROBE);
            assert!(report.note.is_some_and(|n| n.contains("`nvml` feature")));
        }
        #[cfg(feature = "nvml")]
        assert_eq!(report.source, "nvml");
    }

    #[cfg(feature = "nvml")]
    #[test]
    fn nvml_errors_are_classified() {
        use nvml_wrapper::error::NvmlError;
        assert!(matches!(
            nvml::init_error(NvmlError::LibraryNotFound),
            GpuError::LibraryMissing { .. }
        ));
        assert!(matches!(
            nvml::init_error(NvmlError::DriverNotLoaded),
            GpuError::DriverNotLoaded { .. }
        ));
        assert!(matches!(
            nvml::init_error(NvmlError::NoPermission),
            GpuError::NoPermission { .. }
        ));
        assert!(matches!(
            nvml::init_error(NvmlError::LibRmVersionMismatch),
            GpuError::Driver { .. }
        ));
    }

    #[cfg(feature = "nvml")]
    #[test]
    fn nvml_without_its_library_reports_library_missing() {
        // A path that cannot exist exercises the real loading failure on any machine, with
        // or without NVIDIA's library installed.
        let probe = NvmlProbe::with_library("/nonexistent/swarmbus-test/libnvidia-ml.so.1");
        let report = detect_with(&probe);
        assert!(report.gpus.is_empty());
        assert_eq!(report.source, "nvml");
        assert!(
            matches!(report.error, Some(GpuError::LibraryMissing { .. })),
            "{:?}",
            report.error
        );
        assert!(report.note.is_some_and(|n| n.contains("swarmbus-test")));
        // Not cached: the next probe tries again and fails the same way.
        assert!(matches!(
            probe.probe(),
            Err(GpuError::LibraryMissing { .. })
        ));
    }
}
