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
#[command(version, args_conflicts_with_subcommands = true, after_help = ENVIRONMENT)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// UDP address to listen on (loopback only unless auth.mode = "required").
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// The bulk listener: auto (listen's address, a port the OS picks; the default), off,
    /// or a UDP address (port 0: one the OS picks). Printed at start.
    #[arg(long, value_name = "auto|off|ADDR")]
    bulk_listen: Option<swarmbus_router::config::BulkListen>,
    /// The admin listener (HTTP: /metrics, /healthz, /readyz): a loopback TCP address
    /// (default 127.0.0.1:9464) or off.
    #[arg(long, value_name = "ADDR|off")]
    admin_listen: Option<swarmbus_router::config::AdminListen>,
    /// Directory for router state (TLS material; the event log later).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// TOML configuration file (see router/swarmbus.example.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Routing shards (0 = one per core).
    #[arg(long, value_name = "N")]
    shards: Option<usize>,
    /// Validates the configuration (defaults, file, environment, flags), prints the
    /// effective configuration as TOML and exits: 0 when valid, 1 with the error otherwise.
    #[arg(long)]
    check_config: bool,
}

/// The environment variables the router reads (`--help` lists them).
const ENVIRONMENT: &str = "\
Environment (each wins over the file; flags win over both):
  SWARMBUS_<SECTION>__<KEY>   any key of any section, e.g. SWARMBUS_LOG__SEGMENT_BYTES=1048576,
                              SWARMBUS_RATE_LIMITS__COMMAND__RATE_PER_S=5000 (a TOML value, or text)
  SWARMBUS_LISTEN, SWARMBUS_BULK_LISTEN, SWARMBUS_ADMIN_LISTEN,
  SWARMBUS_ADMIN_METRICS_OPEN, SWARMBUS_DATA_DIR,
  SWARMBUS_ROUTER_NAME, SWARMBUS_SHARDS                  the top-level keys
  SWARMBUS_TLS_CERT, SWARMBUS_TLS_KEY                     tls.cert, tls.key
  SWARMBUS_AUTH_MODE                                      auth.mode
  SWARMBUS_MAX_FRAME_BYTES, SWARMBUS_MAX_CONNECTIONS      limits.max_frame_bytes, limits.max_connections
  SWARMBUS_LOG_SYNC, SWARMBUS_LOG_WRITER                  log.sync, log.writer
  SWARMBUS_BULK_THREADS, SWARMBUS_BULK_PRIORITY           runtime.bulk_threads, runtime.bulk_priority
  SWARMBUS_LOG                the log filter (tracing), e.g. debug or swarmbus_router::shard=debug,info
An unknown SWARMBUS_ variable is an error. See docs/configuration.md.";

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Development credentials.
    #[command(subcommand)]
    Creds(Creds),
    /// Reloads the router running on DIR (as SIGHUP does: the server certificate, the
    /// trusted keys, revocations, policy, client CA and CRLs) and prints the outcome as
    /// JSON; exits non-zero when a part failed (that part keeps what it had).
    Reload {
        /// The running router's data dir (its pid is in DATA_DIR/router.pid).
        #[arg(
            long,
            value_name = "DIR",
            env = "SWARMBUS_DATA_DIR",
            default_value = "./swarmbus-data"
        )]
        data_dir: PathBuf,
        /// How long to wait for the router's report.
        #[arg(long, value_name = "SECONDS", default_value_t = 10)]
        timeout_s: u64,
    },
}

#[derive(Debug, clap::Subcommand)]
enum Creds {
    /// Prints a credential (an Ed25519 JWT) for AGENT, granting ROLE in the swarms PATTERN
    /// names, signed with the data dir's development key (made if missing) or `--key`.
    Issue {
        /// The router's data dir, whose development key signs (DATA_DIR/auth/dev-signing.pem).
        #[arg(long, value_name = "DIR", default_value = "./swarmbus-data")]
        data_dir: PathBuf,
        /// Sign with this Ed25519 private key (PKCS#8 PEM) instead.
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// The agent id (the credential's sub).
        #[arg(long, value_name = "ID")]
        agent: String,
        /// agent, controller, worker or admin.
        #[arg(long, value_name = "ROLE")]
        role: String,
        /// A swarm name, `prefix.*` or `*`; repeat for more.
        #[arg(long = "swarm", value_name = "PATTERN", required = true)]
        swarms: Vec<String>,
        /// How long it is valid: 90s, 30m, 1h, 7d (plain numbers are seconds).
        #[arg(long, value_name = "TTL", default_value = "1h")]
        ttl: String,
    },
}

/// Seconds of a TTL such as `90s`, `30m`, `1h` or `7d` (plain numbers are seconds).
fn ttl_seconds(text: &str) -> anyhow::Result<u64> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let number: u64 = number
        .parse()
        .with_context(|| format!("--ttl {text:?}: expected a number and s, m, h or d"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => anyhow::bail!("--ttl {text:?}: the unit is s, m, h or d"),
    };
    // A credential is good until it expires or is revoked: it may not live for ever.
    const MAX_TTL_S: u64 = 365 * 86_400;
    match number.checked_mul(scale) {
        Some(seconds @ 1..=MAX_TTL_S) => Ok(seconds),
        _ => anyhow::bail!("--ttl {text:?}: must be between 1 s and 365 d"),
    }
}

fn issue_credential(creds: Creds) -> anyhow::Result<()> {
    let Creds::Issue {
        data_dir,
        key,
        agent,
        role,
        swarms,
        ttl,
    } = creds;
    let role = swarmbus_router::auth::GrantRole::parse(&role)
        .with_context(|| format!("--role {role:?}: expected agent, controller, worker or admin"))?;
    if !swarmbus_schema::valid_name(&agent) {
        anyhow::bail!("--agent {agent:?}: not a valid agent id");
    }
    if let Some(pattern) = swarms
        .iter()
        .find(|p| !swarmbus_router::auth::valid_pattern(p))
    {
        anyhow::bail!(
            "--swarm {pattern:?}: a swarm name, prefix.* or * (names starting with $ are the router's)"
        );
    }
    let key = match key {
        Some(path) => path,
        None => swarmbus_router::auth::ensure_dev_key(&data_dir)?.0,
    };
    let pem = std::fs::read(&key).with_context(|| format!("reading {}", key.display()))?;
    let mut jti = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut jti)
        .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the wall clock is before 1970")?
        .as_secs();
    let issue = swarmbus_router::auth::Issue {
        agent,
        grants: swarms.into_iter().map(|swarm| (swarm, role)).collect(),
        ttl_s: ttl_seconds(&ttl)?,
        now_s,
        jti: jti.iter().map(|b| format!("{b:02x}")).collect(),
    };
    let token = swarmbus_router::auth::issue(&pem, &issue).map_err(anyhow::Error::msg)?;
    // The jti on stderr, for `auth.revocations`; the token alone on stdout, for scripts.
    eprintln!("jti {}", issue.jti);
    println!("{token}");
    Ok(())
}

fn load_config(args: &Args) -> anyhow::Result<Config> {
    let mut config = Config::load(args.config.as_deref(), std::env::vars())?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(bulk) = args.bulk_listen {
        config.bulk_listen = bulk;
    }
    if let Some(admin) = args.admin_listen {
        config.admin_listen = admin;
    }
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(shards) = args.shards {
        config.shards = shards;
    }
    Ok(config)
}

/// SIGTERM and SIGINT (Ctrl-C), registered before the start line is printed: from then on
/// either stops the router gracefully (registered at the first wait instead, one that came
/// just after the start line ended the process at once).
struct Stops {
    #[cfg(unix)]
    signals: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Stops {
    fn register() -> Stops {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let signals = signal(SignalKind::terminate())
                .and_then(|term| Ok((term, signal(SignalKind::interrupt())?)))
                .ok();
            Stops { signals }
        }
        #[cfg(not(unix))]
        Stops {}
    }

    /// Resolves at the first SIGTERM or SIGINT.
    async fn next(&mut self) {
        #[cfg(unix)]
        if let Some((term, int)) = &mut self.signals {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// SIGHUPs, once registered (none where there are no such signals). Registered before
/// the start line is printed: from then on a SIGHUP reloads and never stops the router.
struct Hangups {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangups {
    fn register() -> Hangups {
        Hangups {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }

    /// Resolves at the next SIGHUP.
    async fn next(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = &mut self.signal {
            if signal.recv().await.is_some() {
                return;
            }
        }
        std::future::pending::<()>().await
    }
}

/// SIGHUP (and `swarmbus-router reload`): the server certificate and key (when configured)
/// are read again for new connections, and the trusted keys, revocations, policy, client CA
/// and CRLs, closing the live sessions no longer accepted. Each part that fails changes
/// nothing of its own. The outcome goes to the log and to `DATA_DIR/reload.json`.
fn reload(router: &Router, data_dir: &std::path::Path, sequence: u64) {
    // Files and one signature check per session: off the runtime's other work.
    let report = tokio::task::block_in_place(|| {
        let mut report = swarmbus_router::reload::ReloadReport {
            pid: std::process::id(),
            sequence,
            ok: true,
            ..Default::default()
        };
        report.tls = match router.reload_tls() {
            Ok(true) => {
                tracing::info!("reloaded the server certificate and key");
                "reloaded".into()
            }
            Ok(false) => "unchanged".into(),
            Err(error) => {
                let error = format!("{:#}", anyhow::Error::from(error));
                tracing::error!(%error, "TLS reload failed; the certificate and key are as they were");
                report.ok = false;
                error
            }
        };
        report.auth = match router.auth_mode() {
            swarmbus_router::auth::AuthMode::None => "off".into(),
            swarmbus_router::auth::AuthMode::Required => match router.reload_auth() {
                Ok(closed) => {
                    tracing::info!(
                        closed,
                        "reloaded the trusted keys, revocations, policy and client CA"
                    );
                    report.closed = closed;
                    "reloaded".into()
                }
                Err(error) => {
                    let error = format!("{:#}", anyhow::Error::from(error));
                    tracing::error!(%error, "reload failed; the trusted keys, revocations, policy and client CA are as they were");
                    report.ok = false;
                    error
                }
            },
        };
        report
    });
    let report = swarmbus_router::reload::ReloadReport {
        at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64),
        ..report
    };
    if let Err(error) = report.write(data_dir) {
        tracing::warn!(%error, "the reload report was not written");
    }
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

/// Logs to stderr, as `format` says, filtered by `SWARMBUS_LOG` (`info` by default).
fn init_logging(format: swarmbus_router::config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SWARMBUS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        swarmbus_router::config::LogFormat::Text => logs.init(),
        swarmbus_router::config::LogFormat::Json => logs.json().init(),
    }
}

async fn run() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.command.is_some() {
        init_logging(swarmbus_router::config::LogFormat::Text);
    }
    match args.command.take() {
        Some(Command::Creds(creds)) => return issue_credential(creds),
        Some(Command::Reload {
            data_dir,
            timeout_s,
        }) => {
            let timeout = std::time::Duration::from_secs(timeout_s);
            let report = tokio::task::spawn_blocking(move || {
                swarmbus_router::reload::signal_reload(&data_dir, timeout)
            })
            .await??;
            println!("{}", serde_json::to_string(&report)?);
            if !report.ok {
                anyhow::bail!(
                    "the reload failed in part (see tls and auth above); that part is unchanged"
                );
            }
            return Ok(());
        }
        None => {}
    }
    let config = load_config(&args)?;
    if args.check_config {
        config.validate()?;
        // The files it names too: the server certificate and key, and those of [auth].
        if let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) {
            swarmbus_router::tls::ServerIdentity::load(cert, key)?;
        }
        swarmbus_router::auth::Authenticator::check_files(&config.auth, &config.data_dir)?;
        // Secrets are shown as set, never printed.
        let mut shown = config.clone();
        for secret in [&mut shown.jetstream.password, &mut shown.jetstream.token] {
            if secret.is_some() {
                *secret = Some("(set)".into());
            }
        }
        print!(
            "{}",
            toml::to_string(&shown).context("printing the configuration")?
        );
        return Ok(());
    }
    init_logging(config.log.format);
    let data_dir = config.data_dir.clone();
    let router = Router::start(config).await.context("starting the router")?;
    let mut hangups = Hangups::register();
    let mut stops = Stops::register();
    // Written once a SIGHUP reloads: `swarmbus-router reload` may signal from then on.
    let _pid_file = swarmbus_router::reload::PidFile::write(&data_dir).with_context(|| {
        format!(
            "writing {}",
            swarmbus_router::reload::pid_path(&data_dir).display()
        )
    })?;
    {
        let mut stdout = std::io::stdout().lock();
        // One line; scripts take the address after "listening on" and, when there is one,
        // the bulk listener's after "bulk listener on".
        let mut notes = Vec::new();
        if let Some(bulk) = router.bulk_addr() {
            notes.push(format!("bulk listener on {bulk}"));
        }
        if let Some(admin) = router.admin_addr() {
            notes.push(format!("admin on http://{admin}"));
        }
        if let Some(ca) = router.ca_path() {
            notes.push(format!("development CA: {}", ca.display()));
        }
        notes.push(match router.auth_mode() {
            swarmbus_router::auth::AuthMode::None => "auth: none, unauthenticated".to_owned(),
            swarmbus_router::auth::AuthMode::Required => "auth: required".to_owned(),
        });
        writeln!(
            stdout,
            "swarmbus-router listening on {} ({})",
            router.local_addr(),
            notes.join("; ")
        )?;
        stdout.flush()?;
    }
    swarmbus_router::notify::notify("READY=1");
    let shutdown = stops.next();
    tokio::pin!(shutdown);
    let mut reloads = 0;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = hangups.next() => {
                reloads += 1;
                swarmbus_router::notify::notify("RELOADING=1");
                reload(&router, &data_dir, reloads);
                swarmbus_router::notify::notify("READY=1");
            }
        }
    }
    tracing::info!("shutting down");
    swarmbus_router::notify::notify("STOPPING=1");
    // Held until the process exits: /readyz says "shutting down" to the end.
    let _stopped = router.shutdown().await;
    Ok(())
}
