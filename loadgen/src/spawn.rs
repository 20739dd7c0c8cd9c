//! Where a run's sessions connect: `--router` (one address or several, [`Routers`]) or
//! `--spawn-router`, which runs a router child process on a temporary data dir for one run
//! ([`spawn_router_with`] takes a router binary and a TOML configuration); and a sampler of
//! a process's resident memory ([`RssSampler`]).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A router child process; killed when dropped.
#[derive(Debug)]
pub struct SpawnedRouter {
    child: Child,
    pub addr: std::net::SocketAddr,
    /// The bulk listener's address, when the router was configured with one.
    pub bulk_addr: Option<std::net::SocketAddr>,
    pub ca: PathBuf,
    options: SpawnOptions,
    _data: tempfile::TempDir,
}

impl SpawnedRouter {
    /// The development signing key a router with `auth.mode = "required"` made in its data
    /// dir.
    pub fn dev_signing_key(&self) -> PathBuf {
        self._data.path().join("auth").join("dev-signing.pem")
    }

    /// The child's process id; `None` once it has exited and been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Restarts the router as an operator would: SIGTERM (the router closes every
    /// connection with ShuttingDown), wait for the process to exit, then start it again on
    /// the same address and data dir.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            let status = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .context("running kill -TERM")?;
            if !status.success() {
                bail!("kill -TERM {pid} failed: {status}");
            }
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(result) => {
                result.context("waiting for the router to exit")?;
            }
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("the router did not exit within 30 s of SIGTERM");
            }
        }
        // The port is free once the process is gone; try a few times in case the kernel
        // is slow to release it.
        let mut last = None;
        for _ in 0..50 {
            match start(&self.options, self._data.path(), &self.addr.to_string()).await {
                Ok((child, addr, bulk_addr)) => {
                    self.child = child;
                    self.addr = addr;
                    self.bulk_addr = bulk_addr;
                    return Ok(());
                }
                Err(error) => {
                    last = Some(error);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("restarting the router failed")))
    }
}

/// How to start a router child.
#[derive(Clone, Debug, Default)]
pub struct SpawnOptions {
    /// The router binary (default: `swarmbus-router` beside this executable, else on PATH).
    pub binary: Option<PathBuf>,
    /// Run it with `auth.mode = "required"` (its development key signs the credentials).
    pub auth: bool,
    /// A TOML configuration (see `router/swarmbus.example.toml`), written into the data dir
    /// and passed with `--config`. The listen address and data dir come from flags, which
    /// win over the file.
    pub config_toml: Option<String>,
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

/// Starts a router on 127.0.0.1, port 0, with a fresh temporary data dir, and waits until
/// it prints its address.
pub async fn spawn_router_with(options: &SpawnOptions) -> anyhow::Result<SpawnedRouter> {
    let data = tempfile::Builder::new()
        .prefix("swarmbus-loadgen-")
        .tempdir()
        .context("creating a temporary data dir")?;
    let (child, addr, bulk_addr) = start(options, data.path(), "127.0.0.1:0").await?;
    Ok(SpawnedRouter {
        child,
        addr,
        bulk_addr,
        ca: data.path().join("tls").join("ca.pem"),
        options: options.clone(),
        _data: data,
    })
}

/// Starts the router process on `listen` with `data` as its data dir and waits until it
/// prints its address (and its bulk listener's, when it has one).
async fn start(
    options: &SpawnOptions,
    data: &Path,
    listen: &str,
) -> anyhow::Result<(Child, SocketAddr, Option<SocketAddr>)> {
    let binary = router_binary(options.binary.as_deref());
    let mut command = Command::new(&binary);
    command
        .arg("--listen")
        .arg(listen)
        .arg("--data-dir")
        .arg(data);
    if let Some(toml) = &options.config_toml {
        let path = data.join("router.toml");
        std::fs::write(&path, toml).with_context(|| format!("writing {}", path.display()))?;
        command.arg("--config").arg(path);
    }
    if options.auth {
        command.env("SWARMBUS_AUTH_MODE", "required");
    }
    // Runs side by side (and the loadgen's tests at once): each admin listener on a port of
    // its own, whatever a --router-config says.
    command.env("SWARMBUS_ADMIN_LISTEN", "127.0.0.1:0");
    let mut child = command
        .env(
            "SWARMBUS_LOG",
            std::env::var("SWARMBUS_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let (addr, bulk_addr) = wait_for_start_line(&mut child, "router", parse_start_line).await?;
    Ok((child, addr, bulk_addr))
}

/// Reads a child's stdout (piped) until `parse` recognises its start line (`who listening
/// on ...`), for at most 30 s, then keeps draining it so the child never blocks on a full
/// pipe.
pub async fn wait_for_start_line<T>(
    child: &mut Child,
    who: &str,
    mut parse: impl FnMut(&str) -> Option<anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("{who} stdout missing"))?;
    let mut lines = BufReader::new(stdout).lines();
    let parsed = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(parsed) = parse(&line) {
                return parsed;
            }
        }
        bail!("the {who} exited before it was ready")
    })
    .await
    .with_context(|| format!("waiting for the {who} to print `listening on`"))??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(parsed)
}

/// The addresses in the router's start line, `swarmbus-router listening on ADDR` with an
/// optional `(bulk listener on ADDR; development CA: PATH)`; `None` for any other line.
fn parse_start_line(line: &str) -> Option<anyhow::Result<(SocketAddr, Option<SocketAddr>)>> {
    let rest = line.split("listening on ").nth(1)?;
    let parse = |what: &str, text: &str| -> anyhow::Result<SocketAddr> {
        text.parse()
            .with_context(|| format!("parsing the {what} address from {line:?}"))
    };
    let main = rest.split_whitespace().next().unwrap_or_default();
    let bulk = line.split("bulk listener on ").nth(1).map(|rest| {
        rest.split(|c: char| c.is_whitespace() || c == ';' || c == ')')
            .next()
            .unwrap_or_default()
    });
    Some((|| {
        let main = parse("router's", main)?;
        let bulk = bulk.map(|b| parse("bulk listener's", b)).transpose()?;
        Ok((main, bulk))
    })())
}

/// The routers a run's sessions connect to: the addresses of `--router`, in the order given
/// (several for routers of one cluster sharing swarms on NATS JetStream), or the one router
/// of `--spawn-router`. Scenarios spread their sessions over them in turn ([`Routers::pick`]).
///
/// Invariant: never empty (every constructor checks or gives one address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routers(Vec<SocketAddr>);

impl Routers {
    /// One router.
    pub fn one(addr: SocketAddr) -> Self {
        Routers(vec![addr])
    }

    /// Resolves `list`, one `HOST:PORT` or several separated by commas (spaces around each
    /// are ignored); an empty entry is refused, naming it. Each entry takes the first
    /// address it resolves to.
    pub async fn resolve(list: &str) -> anyhow::Result<Self> {
        let mut addrs = Vec::new();
        for entry in router_entries(list)? {
            let addr = tokio::net::lookup_host(entry)
                .await
                .with_context(|| format!("resolving {entry}"))?
                .next()
                .with_context(|| format!("{entry} resolves to no address"))?;
            addrs.push(addr);
        }
        Ok(Routers(addrs))
    }

    /// The router of session `index`: `index` modulo the number of routers, so sessions
    /// numbered from 0 land on every router in turn.
    pub fn pick(&self, index: usize) -> SocketAddr {
        self.0[index % self.0.len()]
    }

    /// The first router given.
    pub fn first(&self) -> SocketAddr {
        self.0[0]
    }

    /// The number of routers (at least 1).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The one router, for a scenario that cannot spread over several; with more than one
    /// it refuses, saying `why` (e.g. "presence takes one router: ...").
    pub fn only(&self, why: &str) -> anyhow::Result<SocketAddr> {
        if self.0.len() > 1 {
            bail!(
                "{why}; give --router one address, not {} ({self})",
                self.0.len()
            );
        }
        Ok(self.first())
    }
}

/// The resolved addresses in the order given, separated by commas (`A,B,C`), so a message
/// that names "the router" names every one.
impl fmt::Display for Routers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, addr) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{addr}")?;
        }
        Ok(())
    }
}

/// The entries of a `--router` list, trimmed; refuses an empty one (`A,,B`, a trailing
/// comma, an empty flag), naming its position, before anything is resolved.
fn router_entries(list: &str) -> anyhow::Result<Vec<&str>> {
    list.split(',')
        .map(str::trim)
        .enumerate()
        .map(|(i, entry)| {
            if entry.is_empty() {
                bail!(
                    "--router {list:?}: entry {} is empty (give HOST:PORT, or several separated by commas)",
                    i + 1
                );
            }
            Ok(entry)
        })
        .collect()
}

/// Where to find the routers: `--router` and `--ca`, or `--spawn-router`.
#[derive(Debug, clap::Args)]
pub struct RouterArgs {
    /// Router address, HOST:PORT, or several separated by commas (routers of one cluster,
    /// sharing swarms on NATS JetStream): each scenario spreads its sessions over them in
    /// turn, session i to router i mod n (not needed with --spawn-router).
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT...]")]
    router: Option<String>,
    /// CA certificate the router's certificate chains to (DATA_DIR/tls/ca.pem for a
    /// development router).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The process id of the router given by --router, when it runs on this host: the run
    /// then reports its CPU seconds beside the loadgen's. One process: with several
    /// routers, the CPU reported is that one router's.
    #[arg(long, value_name = "PID", conflicts_with = "spawn_router")]
    router_pid: Option<u32>,
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
    /// TOML configuration for the router of --spawn-router (see
    /// router/swarmbus.example.toml); replaces the scenario's own, if it has one.
    #[arg(long, value_name = "FILE", requires = "spawn_router")]
    router_config: Option<PathBuf>,
    /// With --spawn-router: the router requires credentials (`auth.mode = "required"`),
    /// and the loadgen gives each agent one signed with the router's development key.
    #[arg(long, requires = "spawn_router")]
    auth: bool,
    /// An Ed25519 signing key (PKCS#8 PEM) the router trusts: each agent shows a
    /// credential signed with it (for a router with `auth.mode = "required"`).
    #[arg(long, value_name = "FILE", conflicts_with = "auth")]
    creds: Option<PathBuf>,
    /// The signer, once the router is known (set by `resolve`).
    #[arg(skip)]
    signer: std::sync::OnceLock<Option<std::sync::Arc<crate::creds::Signer>>>,
}

impl RouterArgs {
    /// The routers' addresses and CA, starting a child router if asked (then the one
    /// address is its).
    pub async fn resolve(&self) -> anyhow::Result<(Routers, PathBuf, Option<SpawnedRouter>)> {
        self.resolve_with_config(None).await
    }

    /// Like [`RouterArgs::resolve`]; a spawned router runs with `--router-config` if given,
    /// else with `default_toml` (the scenario's configuration), else with its defaults.
    pub async fn resolve_with_config(
        &self,
        default_toml: Option<&str>,
    ) -> anyhow::Result<(Routers, PathBuf, Option<SpawnedRouter>)> {
        if self.spawn_router {
            let config_toml = match &self.router_config {
                Some(path) => Some(
                    std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?,
                ),
                None => default_toml.map(str::to_owned),
            };
            let spawned = spawn_router_with(&SpawnOptions {
                binary: self.router_bin.clone(),
                auth: self.auth,
                config_toml,
            })
            .await?;
            self.sign_for(Some(&spawned))?;
            return Ok((
                Routers::one(spawned.addr),
                spawned.ca.clone(),
                Some(spawned),
            ));
        }
        let (Some(router), Some(ca)) = (self.router.as_deref(), self.ca.as_ref()) else {
            bail!("give the router as --router HOST:PORT with --ca FILE, or use --spawn-router");
        };
        self.sign_for(None)?;
        let routers = Routers::resolve(router).await?;
        Ok((routers, ca.clone(), None))
    }

    /// The router process whose CPU a run reports: the spawned one, else `--router-pid`.
    pub fn measured_pid(&self, spawned: Option<&SpawnedRouter>) -> Option<u32> {
        spawned.and_then(SpawnedRouter::pid).or(self.router_pid)
    }

    /// Like [`RouterArgs::resolve`], for a spawned router with a bulk listener (the router's
    /// default, `bulk_listen = "auto"`, unless `--router-config` sets another address);
    /// returns the bulk listener's address too.
    pub async fn resolve_with_bulk_listener(
        &self,
    ) -> anyhow::Result<(Routers, SocketAddr, PathBuf, SpawnedRouter)> {
        if !self.spawn_router {
            bail!("a bulk listener is added only to a router of --spawn-router");
        }
        let user = match &self.router_config {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?,
            None => String::new(),
        };
        check_bulk_listener(&user).map_err(|e| {
            anyhow!(
                "reading {}: {e}",
                self.router_config
                    .as_deref()
                    .unwrap_or(Path::new("-"))
                    .display()
            )
        })?;
        let spawned = spawn_router_with(&SpawnOptions {
            binary: self.router_bin.clone(),
            auth: self.auth,
            config_toml: Some(user),
        })
        .await?;
        self.sign_for(Some(&spawned))?;
        let bulk = spawned
            .bulk_addr
            .ok_or_else(|| anyhow!("the spawned router printed no bulk listener"))?;
        Ok((
            Routers::one(spawned.addr),
            bulk,
            spawned.ca.clone(),
            spawned,
        ))
    }

    /// Loads the signer of the run's credentials: `--creds`, or the spawned router's
    /// development key with `--auth`.
    fn sign_for(&self, spawned: Option<&SpawnedRouter>) -> anyhow::Result<()> {
        let key = match (&self.creds, spawned) {
            (Some(path), _) => Some(path.clone()),
            (None, Some(spawned)) if self.auth => Some(spawned.dev_signing_key()),
            _ => None,
        };
        let signer = key
            .map(|key| crate::creds::Signer::load(&key))
            .transpose()?;
        let _ = self.signer.set(signer);
        Ok(())
    }

    /// A connector that trusts `ca` and, on a router that requires them, gives each
    /// session a credential of its own.
    pub fn connector(&self, ca: &Path) -> anyhow::Result<swarmbus_client::Connector> {
        connector(ca, &self.server_name, self.signer().as_ref())
    }

    /// The signer of the run's credentials, once the router is resolved (none when the
    /// router does not require them).
    pub fn signer(&self) -> Option<Arc<crate::creds::Signer>> {
        self.signer.get().cloned().flatten()
    }

    /// Whether the run starts its own router (`--spawn-router`).
    pub fn spawns(&self) -> bool {
        self.spawn_router
    }

    pub fn server_name(&self) -> &str {
        &self.server_name
    }
}

/// A connector that trusts `ca` for `server_name` and, with a `signer`, gives each session a
/// credential of its own.
pub fn connector(
    ca: &Path,
    server_name: &str,
    signer: Option<&Arc<crate::creds::Signer>>,
) -> anyhow::Result<swarmbus_client::Connector> {
    let connector = swarmbus_client::Connector::new(ca, server_name)
        .with_context(|| format!("TLS setup with CA {}", ca.display()))?;
    Ok(match signer.cloned() {
        Some(signer) => connector.with_credentials(move |agent| signer.credential(agent)),
        None => connector,
    })
}

/// Refuses a router configuration (TOML) that turns the bulk listener off. The router checks
/// the whole file when it starts; the loadgen reads this one key of it (and so does not link
/// the router).
fn check_bulk_listener(config_toml: &str) -> anyhow::Result<()> {
    let table: toml::Table = toml::from_str(config_toml)?;
    if table.get("bulk_listen").and_then(toml::Value::as_str) == Some("off") {
        bail!(
            "this run needs the router's bulk listener: --router-config sets bulk_listen = \"off\""
        );
    }
    Ok(())
}

/// Samples a process's resident memory (`VmRSS` in `/proc/<pid>/status`) at a fixed interval
/// and keeps the largest value seen. Linux only: elsewhere nothing is ever sampled.
#[derive(Debug)]
pub struct RssSampler {
    max_bytes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    pub fn start(pid: u32, every: Duration) -> Self {
        let max_bytes = Arc::new(AtomicU64::new(0));
        let max = max_bytes.clone();
        let task = tokio::spawn(async move {
            let path = PathBuf::from(format!("/proc/{pid}/status"));
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                // A small procfs file: reading it inline costs microseconds.
                match std::fs::read_to_string(&path) {
                    Ok(status) => {
                        if let Some(bytes) = vm_rss_bytes(&status) {
                            max.fetch_max(bytes, Ordering::Relaxed);
                        }
                    }
                    Err(_) => return, // the process is gone
                }
            }
        });
        RssSampler { max_bytes, task }
    }

    /// Stops sampling; the largest resident size seen, `None` if no sample was taken.
    pub fn stop(self) -> Option<u64> {
        self.task.abort();
        Some(self.max_bytes.load(Ordering::Relaxed)).filter(|&bytes| bytes > 0)
    }
}

/// The `VmRSS` line of a `/proc/<pid>/status` text, in bytes.
fn vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let mut words = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => value.checked_mul(1024),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_config_without_the_bulk_listener_is_refused() {
        use super::check_bulk_listener;
        check_bulk_listener("").unwrap();
        check_bulk_listener("bulk_listen = \"127.0.0.1:0\"\nshards = 2").unwrap();
        let off = check_bulk_listener("bulk_listen = \"off\"").unwrap_err();
        assert!(off.to_string().contains("bulk_listen = \"off\""), "{off}");
        assert!(check_bulk_listener("bulk_listen = ").is_err());
    }

    #[test]
    fn start_lines_give_the_main_and_bulk_addresses() {
        use super::parse_start_line;
        let plain = "swarmbus-router listening on 127.0.0.1:4433";
        let (main, bulk) = parse_start_line(plain).unwrap().unwrap();
        assert_eq!((main.port(), bulk), (4433, None));
        let dev = "swarmbus-router listening on 127.0.0.1:4433 (development CA: ./d/tls/ca.pem)";
        assert_eq!(parse_start_line(dev).unwrap().unwrap().1, None);
        let both = "swarmbus-router listening on 127.0.0.1:4433 (bulk listener on \
                    127.0.0.1:4434; development CA: ./d/tls/ca.pem)";
        let (main, bulk) = parse_start_line(both).unwrap().unwrap();
        assert_eq!((main.port(), bulk.map(|b| b.port())), (4433, Some(4434)));
        let bulk_only = "swarmbus-router listening on 127.0.0.1:1 (bulk listener on 127.0.0.1:2)";
        assert_eq!(
            parse_start_line(bulk_only)
                .unwrap()
                .unwrap()
                .1
                .map(|b| b.port()),
            Some(2)
        );
        assert!(parse_start_line("some other line").is_none());
        assert!(parse_start_line("swarmbus-router listening on nowhere")
            .unwrap()
            .is_err());
    }

    use super::*;

    #[test]
    fn reads_vm_rss_from_proc_status() {
        let status =
            "Name:\tswarmbus-router\nVmPeak:\t  99999 kB\nVmRSS:\t   12345 kB\nThreads:\t4\n";
        assert_eq!(vm_rss_bytes(status), Some(12345 * 1024));
        assert_eq!(vm_rss_bytes("Name:\tkthreadd\n"), None);
    }

    #[tokio::test]
    async fn a_router_list_is_resolved_in_order_and_picked_in_turn() {
        let routers = Routers::resolve("127.0.0.1:1, 127.0.0.1:2").await.unwrap();
        assert_eq!(routers.len(), 2);
        let ports: Vec<u16> = (0..4).map(|i| routers.pick(i).port()).collect();
        assert_eq!(ports, [1, 2, 1, 2]);
        assert_eq!(routers.first().port(), 1);
        assert_eq!(routers.to_string(), "127.0.0.1:1,127.0.0.1:2");
        let why = routers.only("this takes one router").unwrap_err();
        assert!(why.to_string().contains("not 2"), "{why}");

        let one = Routers::resolve("127.0.0.1:7").await.unwrap();
        assert_eq!((one.len(), one.pick(5).port()), (1, 7));
        assert_eq!(one.only("unused").unwrap().port(), 7);
    }

    #[tokio::test]
    async fn an_empty_router_entry_is_refused_by_position() {
        // Refused before "x" is looked up: the empty entry is named, not a DNS failure.
        let error = Routers::resolve("127.0.0.1:1,,x").await.unwrap_err();
        assert!(error.to_string().contains("entry 2 is empty"), "{error}");
        for list in ["", "127.0.0.1:1,", " , 127.0.0.1:1"] {
            assert!(router_entries(list).is_err(), "{list:?}");
        }
        assert_eq!(router_entries(" a:1 ,b:2").unwrap(), ["a:1", "b:2"]);
    }

    #[tokio::test]
    async fn samples_this_process() {
        let sampler = RssSampler::start(std::process::id(), Duration::from_millis(5));
        tokio::time::sleep(Duration::from_millis(30)).await;
        if cfg!(target_os = "linux") {
            assert!(sampler.stop().is_some_and(|bytes| bytes > 0));
        }
    }
}
