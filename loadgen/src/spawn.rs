//! `--spawn-router`: runs a router child process on a temporary data dir for one run.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use std::net::SocketAddr;

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A router child process; killed when dropped.
#[derive(Debug)]
pub struct SpawnedRouter {
    _child: Child,
    pub addr: std::net::SocketAddr,
    pub ca: PathBuf,
    _data: tempfile::TempDir,
}

/// The router binary: `explicit`, else `swarmbus-router` beside this executable, else on PATH.
fn router_binary(explicit: Option<&Path>) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_owned();
    }
    if let Ok(me) = std::env::current_exe() {
        let sibling = me.with_file_name("swarmbus-router");
        if sibling.exists() {
            return sibling;
        }
    }
    PathBuf::from("swarmbus-router")
}

pub async fn spawn_router(explicit: Option<&Path>) -> anyhow::Result<SpawnedRouter> {
    let data = tempfile::Builder::new()
        .prefix("swarmbus-loadgen-")
        .tempdir()
        .context("creating a temporary data dir")?;
    let binary = router_binary(explicit);
    let mut child = Command::new(&binary)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(data.path())
        .env(
            "SWARMBUS_LOG",
            std::env::var("SWARMBUS_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("router stdout missing"))?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                return addr
                    .parse()
                    .with_context(|| format!("parsing the router's address from {line:?}"));
            }
        }
        bail!("the router exited before it was ready")
    })
    .await
    .context("waiting for the router to print `listening on`")??;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(SpawnedRouter {
        _child: child,
        addr,
        ca: data.path().join("tls").join("ca.pem"),
        _data: data,
    })
}

/// Where to find the router: `--router` and `--ca`, or `--spawn-router`.
#[derive(Debug, clap::Args)]
pub struct RouterArgs {
    /// Router address, HOST:PORT (not needed with --spawn-router).
    #[arg(long, required_unless_present = "spawn_router")]
    router: Option<String>,
    /// CA certificate the router's certificate chains to (DATA_DIR/tls/ca.pem for a
    /// development router).
    #[arg(long, required_unless_present = "spawn_router")]
    ca: Option<PathBuf>,
    /// Name the router's certificate must carry.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Start a router child process on a temporary data dir for this run (it inherits this
    /// process's environment, e.g. SWARMBUS_LOG_SYNC or SWARMBUS_LOG_WRITER).
    #[arg(long)]
    spawn_router: bool,
    /// Router binary for --spawn-router (default: swarmbus-router beside this binary).
    #[arg(long, value_name = "PATH")]
    router_bin: Option<PathBuf>,
}

impl RouterArgs {
    /// The router's address and CA, starting a child router if asked.
    pub async fn resolve(&self) -> anyhow::Result<(SocketAddr, PathBuf, Option<SpawnedRouter>)> {
        if self.spawn_router {
            let spawned = spawn_router(self.router_bin.as_deref()).await?;
            return Ok((spawned.addr, spawned.ca.clone(), Some(spawned)));
        }
        let router = self.router.as_deref().unwrap_or_default();
        let addr = tokio::net::lookup_host(router)
            .await
            .with_context(|| format!("resolving {router}"))?
            .next()
            .with_context(|| format!("{router} resolves to no address"))?;
        Ok((addr, self.ca.clone().unwrap_or_default(), None))
    }

    pub fn server_name(&self) -> &str {
        &self.server_name
    }
}
