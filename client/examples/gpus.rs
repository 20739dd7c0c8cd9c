//! Prints what this node's worker would report about its GPUs, as JSON on stdout.
//!
//! ```text
//! cargo run -p swarmbus-client --example gpus --features nvml
//! cargo run -p swarmbus-client --example gpus --features nvml -- --require-gpus
//! ```
//!
//! `source` says which probe answered ("nvml", or "none" when built without the `nvml`
//! feature), `note` why no GPU is listed, `error` the probe's error kind; `affinity` is what
//! placement gets. The probe's warning, if any, goes to stderr (`SWARMBUS_LOG` filters it).
//! Exits 0 whatever was found, so a node without GPUs is not an error; with
//! `--require-gpus` it exits 1 when the list is empty (the check to run on GPU hardware).

use std::io::IsTerminal;
use std::process::ExitCode;

use serde::Serialize;
use swarmbus_client::gpu::{detect, GpuError, GpuInfo};
use tracing_subscriber::EnvFilter;

/// The printed report; fields in the order a reader wants them.
#[derive(Serialize)]
struct Output {
    /// Which probe answered: "nvml", or "none" when built without the feature.
    source: &'static str,
    nvml_feature: bool,
    gpu_count: usize,
    /// Why no GPU is listed (null when GPUs were found).
    note: Option<String>,
    /// The probe's error kind (null when it succeeded).
    error: Option<&'static str>,
    gpus: Vec<Gpu>,
    /// What placement (swarmbus-affinity) gets for this node.
    affinity: Affinity,
}

#[derive(Serialize)]
struct Gpu {
    index: u32,
    model: String,
    uuid: String,
    memory_total_bytes: u64,
    memory_free_bytes: u64,
    memory_total_gib: f64,
    memory_free_gib: f64,
    utilization_percent: Option<u32>,
}

#[derive(Serialize)]
struct Affinity {
    count: u32,
    model: String,
    memory_total_bytes: u64,
    memory_free_bytes: u64,
}

fn main() -> ExitCode {
    let require_gpus = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--require-gpus") => true,
        Some(other) => {
            eprintln!("unknown argument {other:?}; usage: gpus [--require-gpus]");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_env("SWARMBUS_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let report = detect();
    let affinity = report.to_affinity();
    let output = Output {
        source: report.source,
        nvml_feature: cfg!(feature = "nvml"),
        gpu_count: report.gpus.len(),
        note: report.note.clone(),
        error: report.error.as_ref().map(error_kind),
        gpus: report.gpus.iter().map(gpu).collect(),
        affinity: Affinity {
            count: affinity.count,
            model: affinity.model,
            memory_total_bytes: affinity.memory_total_bytes,
            memory_free_bytes: affinity.memory_free_bytes,
        },
    };
    match serde_json::to_string_pretty(&output) {
        Ok(text) => println!("{text}"),
        Err(error) => {
            eprintln!("formatting the report: {error}");
            return ExitCode::FAILURE;
        }
    }
    if require_gpus && report.gpus.is_empty() {
        eprintln!("--require-gpus: no GPU detected");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn gpu(info: &GpuInfo) -> Gpu {
    Gpu {
        index: info.index,
        model: info.model.clone(),
        uuid: info.uuid.clone(),
        memory_total_bytes: info.memory_total_bytes,
        memory_free_bytes: info.memory_free_bytes,
        memory_total_gib: gib(info.memory_total_bytes),
        memory_free_gib: gib(info.memory_free_bytes),
        utilization_percent: info.utilization_percent,
    }
}

fn error_kind(error: &GpuError) -> &'static str {
    match error {
        GpuError::LibraryMissing { .. } => "library_missing",
        GpuError::DriverNotLoaded { .. } => "driver_not_loaded",
        GpuError::NoPermission { .. } => "no_permission",
        GpuError::Driver { .. } => "driver",
        GpuError::Device { .. } => "device",
        _ => "other",
    }
}

/// GiB with two decimals, for reading; the byte counts are the exact figures.
fn gib(bytes: u64) -> f64 {
    (bytes as f64 / f64::from(1u32 << 30) * 100.0).round() / 100.0
}
