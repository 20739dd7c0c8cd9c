//! `swarmbus-router`: parses arguments, loads configuration and runs the router.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use swarmbus_router::{Config, Router};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// swarmbus router: orders each swarm's commands and fans messages out over QUIC.
///
/// With no arguments it listens on 127.0.0.1:4433 with data in ./swarmbus-data and a
/// development CA (clients trust ./swarmbus-data/tls/ca.pem).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// UDP address to listen on (loopback only until authentication lands).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// The bulk listener: auto (listen's address, a port the OS picks; the default), off,
    /// or a UDP address (port 0: one the OS picks). Printed at start.
    #[arg(long, value_name = "auto|off|ADDR")]
    bulk_listen: Option<swarmbus_router::config::BulkListen>,
    /// Directory for router state (TLS material; the event log later).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// TOML configuration file (see router/swarmbus.example.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Routing shards (0 = one per core).
    #[arg(long, value_name = "N")]
    shards: Option<usize>,
}

fn load_config(args: &Args) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    config.apply_env(std::env::vars())?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(bulk) = args.bulk_listen {
        config.bulk_listen = bulk;
    }
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(shards) = args.shards {
        config.shards = shards;
    }
    Ok(config)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(|| {
            swarmbus_host::sched::request_short_slice(swarmbus_host::sched::SHORT_SLICE);
        })
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("swarmbus-router: starting the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // One clear line per cause, no backtrace: these are operator errors.
            eprintln!("swarmbus-router: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SWARMBUS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let config = load_config(&args)?;
    let router = Router::start(config).await.context("starting the router")?;
    {
        let mut stdout = std::io::stdout().lock();
        // One line; scripts take the address after "listening on" and, when there is one,
        // the bulk listener's after "bulk listener on".
        let mut notes = Vec::new();
        if let Some(bulk) = router.bulk_addr() {
            notes.push(format!("bulk listener on {bulk}"));
        }
        if let Some(ca) = router.ca_path() {
            notes.push(format!("development CA: {}", ca.display()));
        }
        if notes.is_empty() {
            writeln!(
                stdout,
                "swarmbus-router listening on {}",
                router.local_addr()
            )?;
        } else {
            writeln!(
                stdout,
                "swarmbus-router listening on {} ({})",
                router.local_addr(),
                notes.join("; ")
            )?;
        }
        stdout.flush()?;
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    router.shutdown().await;
    Ok(())
}
