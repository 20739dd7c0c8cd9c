//! `swarmbus-ctl`: a running router's views (from its admin listener) and its safety
//! actions (as a controller session over QUIC), as tables for people or JSON for scripts.
//!
//! Exit codes: 0 done; 1 the router refused or failed the request (the reason on stderr);
//! 2 a usage error; 3 the router or its admin listener could not be reached.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use serde_json::Value;

/// swarmbus-ctl: look inside a running router and act on it.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The router's admin listener (its start line names it).
    #[arg(
        long,
        global = true,
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:9464",
        env = "SWARMBUS_CTL_ADMIN"
    )]
    admin: String,
    /// The router's QUIC address, for actions.
    #[arg(
        long,
        global = true,
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:4433",
        env = "SWARMBUS_CTL_ROUTER"
    )]
    router: String,
    /// The CA that signed the router's certificate (a development router's
    /// DATA_DIR/tls/ca.pem), for actions.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        default_value = "./swarmbus-data/tls/ca.pem",
        env = "SWARMBUS_CTL_CA"
    )]
    ca: PathBuf,
    /// The name the router's certificate carries.
    #[arg(long, global = true, value_name = "NAME", default_value = "localhost")]
    server_name: String,
    /// A file holding the credential to show (a router with auth.mode = "required"): admin
    /// on "*" for the views, controller for the actions.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "SWARMBUS_CTL_CREDENTIAL_FILE"
    )]
    credential_file: Option<PathBuf>,
    /// The agent id of the actions' session: by default the credential's `sub`, or
    /// `swarmbus-ctl` without one.
    #[arg(long, global = true, value_name = "ID")]
    agent: Option<String>,
    /// JSON on stdout instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Readiness and the job queue's counts; exits 1 when the router is not ready.
    Status,
    /// Every swarm: op ids, members, subscribers, the slowest subscriber's lag, log bytes.
    Swarms,
    /// The connections being served: agent, role, remote address, RTT, packets lost.
    Connections,
    /// The members of SWARM, with when each was last seen.
    Presence { swarm: String },
    /// The leases held now.
    Leases,
    /// The job queue's counts and its jobs (of --swarm only, when given).
    Jobs {
        #[arg(long)]
        swarm: Option<String>,
    },
    /// The dead-lettered jobs of SWARM.
    DeadLetters { swarm: String },
    /// Queues a dead-lettered job of SWARM again.
    Redrive { swarm: String, job: u64 },
    /// Pauses SWARM: its commands are logged, not delivered, until it is resumed.
    Pause { swarm: String },
    /// Resumes SWARM.
    Resume { swarm: String },
    /// Stops AGENT: closes its sessions and refuses it for --for.
    StopAgent {
        // Not `agent`: that is the global --agent's id.
        #[arg(value_name = "AGENT")]
        target: String,
        #[arg(long = "for", value_name = "SECONDS", default_value_t = 60)]
        for_s: u64,
    },
    /// Drains worker node NODE (no new sessions or jobs), or takes it back with --undo.
    Drain {
        node: String,
        #[arg(long)]
        undo: bool,
    },
}

/// A failure and the exit code it ends with.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

fn unreachable(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 3,
        error: error.into(),
    }
}

fn usage(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 2,
        error: error.into(),
    }
}

fn refused(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 1,
        error: error.into(),
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("swarmbus-ctl: starting the async runtime: {error}");
            return std::process::ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("swarmbus-ctl: {:#}", failure.error);
            std::process::ExitCode::from(failure.code)
        }
    }
}

async fn run(args: Args) -> Result<(), Failure> {
    let credential = match &args.credential_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))
                .map_err(refused)?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let admin = Admin {
        addr: args.admin.trim_start_matches("http://").to_owned(),
        credential: credential.clone(),
    };
    // Set by `status` when the router is not ready: its output is printed, then it exits 1
    // (a readiness probe can run it).
    let mut not_ready = None;
    let output = match &args.command {
        Command::Status => {
            let (status, ready) = admin.get_text("/readyz").await?;
            if status != 200 {
                not_ready = Some(ready.trim().to_owned());
            }
            // A router that is starting answers no views yet: not ready, and no counts.
            let jobs = match status {
                200 => admin.get("/v1/jobs").await?,
                _ => serde_json::json!({ "queued": null, "running": null, "dead_lettered": null }),
            };
            let json = serde_json::json!({
                "ready": status == 200,
                "readiness": ready.trim(),
                "jobs": jobs,
            });
            let table = format!(
                "ready: {} ({})\njobs: {} queued, {} running, {} dead-lettered\n",
                status == 200,
                ready.trim(),
                jobs["queued"],
                jobs["running"],
                jobs["dead_lettered"]
            );
            (json, table)
        }
        Command::Swarms => {
            let items = admin.all("/v1/swarms?").await?;
            let rows = items.iter().map(|s| {
                vec![
                    text(&s["name"]),
                    s["epoch"].to_string(),
                    s["last_op"].to_string(),
                    s["durable_op"].to_string(),
                    s["members"].to_string(),
                    s["subscribers"]["command"].to_string(),
                    s["ack_lag_ops"].to_string(),
                    s["log_bytes"].to_string(),
                    if s["paused"] == true {
                        "paused".into()
                    } else {
                        String::new()
                    },
                ]
            });
            let header = [
                "SWARM",
                "EPOCH",
                "LAST OP",
                "DURABLE",
                "MEMBERS",
                "CMD SUBS",
                "ACK LAG",
                "LOG BYTES",
                "",
            ];
            (Value::Array(items.clone()), table(&header, rows))
        }
        Command::Connections => {
            let items = admin.all("/v1/connections?").await?;
            let rows = items.iter().map(|c| {
                vec![
                    c["id"].to_string(),
                    text(&c["agent"]),
                    text(&c["role"]),
                    text(&c["remote"]),
                    format!("{:.2}", c["rtt_ms"].as_f64().unwrap_or_default()),
                    c["lost_packets"].to_string(),
                    c.get("queued_bytes").map_or("-".into(), |q| q.to_string()),
                    if c["bulk_attached"] == true {
                        "bulk".into()
                    } else {
                        String::new()
                    },
                ]
            });
            let header = [
                "ID", "AGENT", "ROLE", "REMOTE", "RTT (MS)", "LOST", "QUEUED", "",
            ];
            (Value::Array(items.clone()), table(&header, rows))
        }
        Command::Presence { swarm } => {
            let items = admin
                .all(&format!("/v1/presence?swarm={}&", encode(swarm)))
                .await?;
            let rows = items.iter().map(|m| {
                vec![
                    text(&m["agent"]),
                    text(&m["role"]),
                    m["last_seen_ms"].to_string(),
                ]
            });
            (
                Value::Array(items.clone()),
                table(&["AGENT", "ROLE", "LAST SEEN (MS)"], rows),
            )
        }
        Command::Leases => {
            let items = admin.all("/v1/leases?").await?;
            let rows = items.iter().map(|l| {
                vec![
                    text(&l["swarm"]),
                    text(&l["name"]),
                    text(&l["holder"]),
                    l["token"].to_string(),
                    l["expires_at_ms"].to_string(),
                ]
            });
            let header = ["SWARM", "LEASE", "HOLDER", "TOKEN", "EXPIRES (MS)"];
            (Value::Array(items.clone()), table(&header, rows))
        }
        Command::Jobs { swarm } => {
            let path = match swarm {
                Some(swarm) => format!("/v1/jobs?swarm={}&", encode(swarm)),
                None => "/v1/jobs?".to_owned(),
            };
            let mut jobs = admin.get(&format!("{path}limit=1")).await?;
            let items = admin.all(&path).await?;
            let counts = [
                "jobs",
                "queued",
                "running",
                "dead_lettered",
                "pending_results",
                "leases",
            ]
            .iter()
            .map(|key| vec![key.to_string(), jobs[*key].to_string()])
            .collect::<Vec<_>>();
            let mut rendered = table(&["", "COUNT"], counts.into_iter());
            let rows = items.iter().map(|j| {
                vec![
                    j["job_id"].to_string(),
                    text(&j["swarm"]),
                    text(&j["state"]),
                    j["attempt"].to_string(),
                    text(&j["submitter"]),
                    text(&j["model"]),
                ]
            });
            let header = ["JOB", "SWARM", "STATE", "ATTEMPT", "SUBMITTER", "MODEL"];
            rendered.push('\n');
            rendered.push_str(&table(&header, rows));
            jobs["items"] = Value::Array(items);
            jobs["next"] = Value::Null;
            (jobs, rendered)
        }
        Command::DeadLetters { swarm } => {
            let items = admin
                .all(&format!("/v1/dead-letters?swarm={}&", encode(swarm)))
                .await?;
            let rows = items.iter().map(|d| {
                vec![
                    d["job_id"].to_string(),
                    d["attempts"].to_string(),
                    text(&d["idempotency_key"]),
                    text(&d["reason"]),
                ]
            });
            let header = ["JOB", "ATTEMPTS", "IDEMPOTENCY KEY", "REASON"];
            (Value::Array(items.clone()), table(&header, rows))
        }
        action => {
            let done = act(&args, credential, action).await?;
            (
                done.clone(),
                format!("{}\n", done["done"].as_str().unwrap_or_default()),
            )
        }
    };
    let (json, table) = output;
    if args.json {
        println!("{json}");
    } else {
        print!("{table}");
    }
    match not_ready {
        Some(why) => Err(refused(anyhow::anyhow!("the router is not ready: {why}"))),
        None => Ok(()),
    }
}

/// A safety action or a re-drive, from a controller session.
async fn act(args: &Args, credential: Option<String>, action: &Command) -> Result<Value, Failure> {
    let swarms: Vec<String> = match action {
        Command::Pause { swarm } | Command::Resume { swarm } | Command::Redrive { swarm, .. } => {
            vec![swarm.clone()]
        }
        _ => Vec::new(),
    };
    let connector =
        swarmbus_client::Connector::new(&args.ca, &args.server_name).map_err(refused)?;
    let agent = match (&args.agent, &credential) {
        // The Hello must carry the credential's own subject.
        (Some(_), Some(_)) => {
            return Err(usage(anyhow::anyhow!(
                "--agent and --credential-file: the session is the credential's sub"
            )))
        }
        (Some(agent), None) => agent.clone(),
        (None, Some(token)) => subject_of(token).map_err(refused)?,
        (None, None) => "swarmbus-ctl".to_owned(),
    };
    let mut session =
        swarmbus_client::Session::new(agent, swarmbus_client::Role::Controller, swarms);
    if let Some(token) = credential {
        session = session.with_credential(token);
    }
    session.connect_timeout = Duration::from_secs(10);
    let (client, _deliveries) =
        connector
            .connect_to(&args.router, session)
            .await
            .map_err(|error| match error {
                swarmbus_client::ClientError::Connect { .. }
                | swarmbus_client::ClientError::Timeout { .. } => unreachable(error),
                other => refused(other),
            })?;
    let done = match action {
        Command::Pause { swarm } => client
            .pause(swarm)
            .await
            .map(|()| format!("paused {swarm}")),
        Command::Resume { swarm } => client
            .resume(swarm)
            .await
            .map(|()| format!("resumed {swarm}")),
        Command::StopAgent { target, for_s } => client
            .stop_agent(target, Duration::from_secs(*for_s))
            .await
            .map(|()| format!("stopped {target} for {for_s} s")),
        Command::Drain { node, undo } => client
            .drain_node(node, !undo)
            .await
            .map(|()| format!("{} {node}", if *undo { "undrained" } else { "drained" })),
        Command::Redrive { swarm, job } => client
            .redrive_job(swarm, swarmbus_client::JobId(*job))
            .await
            .map(|status| {
                format!(
                    "re-drove job {} of {swarm}: {:?}",
                    status.job_id.0, status.state
                )
            }),
        _ => unreachable_code(),
    }
    .map_err(refused)?;
    // Closed before the process ends, so that the router drops the session at once (not at
    // its idle timeout).
    client.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), client.closed()).await;
    Ok(serde_json::json!({ "done": done }))
}

/// The `sub` claim of a credential (a JWT), read without verifying it: the router verifies
/// it; this only names the session after it.
fn subject_of(token: &str) -> anyhow::Result<String> {
    use base64::Engine;
    let claims = token
        .split('.')
        .nth(1)
        .context("the credential is not a JWT (header.claims.signature)")?;
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims.trim_end_matches('='))
        .context("the credential's claims are not base64url")?;
    let claims: Value =
        serde_json::from_slice(&claims).context("the credential's claims are not JSON")?;
    claims["sub"]
        .as_str()
        .map(str::to_owned)
        .context("the credential has no sub claim; pass --agent")
}

fn unreachable_code() -> Result<String, swarmbus_client::ClientError> {
    Err(swarmbus_client::ClientError::InvalidArgument {
        detail: "not an action".into(),
    })
}

/// The admin listener, over HTTP/1.
struct Admin {
    addr: String,
    credential: Option<String>,
}

impl Admin {
    /// `GET path`: the status and the body, within 30 s in all.
    async fn get_text(&self, path: &str) -> Result<(u16, String), Failure> {
        tokio::time::timeout(Duration::from_secs(30), self.exchange(path))
            .await
            .map_err(|_| {
                unreachable(anyhow::anyhow!(
                    "the admin listener {} did not answer within 30 s",
                    self.addr
                ))
            })?
    }

    async fn exchange(&self, path: &str) -> Result<(u16, String), Failure> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&self.addr)
            .await
            .with_context(|| format!("resolving the admin listener {}", self.addr))
            .map_err(unreachable)?
            .collect();
        // Each address in turn (localhost may resolve to ::1 first).
        let mut last = None;
        let mut connected = None;
        for addr in addrs {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(stream) => {
                    connected = Some(stream);
                    break;
                }
                Err(error) => last = Some((addr, error)),
            }
        }
        let stream = connected.ok_or_else(|| {
            let why = last.map_or_else(
                || "no address".to_owned(),
                |(addr, error)| format!("{addr}: {error}"),
            );
            unreachable(anyhow::anyhow!(
                "connecting to the admin listener {} (is admin_listen on?): {why}",
                self.addr
            ))
        })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .context("the admin listener's HTTP handshake")
                .map_err(unreachable)?;
        tokio::spawn(connection);
        let mut request = hyper::Request::get(path).header(hyper::header::HOST, &self.addr);
        if let Some(token) = &self.credential {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .context("building the request")
            .map_err(refused)?;
        let response = sender
            .send_request(request)
            .await
            .context("the admin listener's answer")
            .map_err(unreachable)?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .context("reading the admin listener's answer")
            .map_err(unreachable)?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// `GET path` of a JSON view: the value, or the view's error.
    async fn get(&self, path: &str) -> Result<Value, Failure> {
        let (status, body) = self.get_text(path).await?;
        let value: Value = serde_json::from_str(&body)
            .with_context(|| format!("{path} answered {status} with no JSON: {body}"))
            .map_err(refused)?;
        if status != 200 {
            let error = value["error"].as_str().unwrap_or("no reason given");
            return Err(refused(anyhow::anyhow!("{path}: {status}: {error}")));
        }
        Ok(value)
    }

    /// Every item of a paged view (`path` ends with `?` or `&`).
    async fn all(&self, path: &str) -> Result<Vec<Value>, Failure> {
        let mut items = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page_path = match &after {
                Some(key) => format!("{path}limit=1000&after={}", encode(key)),
                None => format!("{path}limit=1000"),
            };
            let page = self.get(&page_path).await?;
            items.extend(page["items"].as_array().cloned().unwrap_or_default());
            match page["next"].as_str() {
                // A next page that does not move on would be asked for ever.
                Some(next) if after.as_deref() == Some(next) => {
                    return Err(refused(anyhow::anyhow!(
                        "{path}: the page after {next:?} is itself"
                    )))
                }
                Some(next) => after = Some(next.to_owned()),
                None => return Ok(items),
            }
        }
    }
}

/// Percent-encodes a query value (names carry few characters that need it).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

fn text(value: &Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_owned)
}

/// Rows under a header, each column as wide as its widest cell.
fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(header.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}
