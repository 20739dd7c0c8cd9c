//! `handshake`: how many sessions per second the router admits. Each of `--concurrency`
//! workers connects a session (QUIC and TLS handshake, Hello with its credential when the
//! router requires one, Welcome, and the bulk connection's attach when the router offers
//! one: two handshakes per session), closes it, and connects the next, for `--duration`.
//! Reports handshakes/s, the connect latency and the errors; run it with `--auth`, with
//! `--client-certs` and with neither, in turn, to see what each kind of identity costs at
//! admission.

use std::time::{Duration, Instant};

use anyhow::Context;
use swarmbus_client::{Role, Session};

use crate::probe::{latency_histogram, latency_json};
use crate::spawn::RouterArgs;
use crate::units::parse_duration;

#[derive(Debug, clap::Args)]
pub struct HandshakeArgs {
    #[command(flatten)]
    router: RouterArgs,
    /// Sessions connecting at once (each worker has a UDP socket of its own).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// How long to connect, e.g. 5s.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// With --spawn-router: sessions show client certificates (mTLS) instead of
    /// credentials. The loadgen makes a client CA and one certificate per worker (its agent
    /// id in the URI SAN), and the spawned router trusts that CA and grants every
    /// certificate identity every swarm.
    #[arg(long, requires = "spawn_router", conflicts_with_all = ["auth", "creds", "router_config"])]
    client_certs: bool,
    /// Print one JSON object as the last stdout line instead of a table.
    #[arg(long)]
    json: bool,
}

/// A client CA for `--client-certs`, with the files the spawned router reads.
struct ClientCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    dir: tempfile::TempDir,
}

impl ClientCa {
    fn new() -> anyhow::Result<ClientCa> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate().context("making the client CA key")?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "swarmbus-loadgen client CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).context("signing the client CA")?;
        let dir = tempfile::Builder::new()
            .prefix("swarmbus-loadgen-ca-")
            .tempdir()
            .context("creating a directory for the client CA")?;
        std::fs::write(dir.path().join("client-ca.pem"), cert.pem())?;
        std::fs::write(
            dir.path().join("policy.toml"),
            "[certificates]\ngrants = { \"*\" = \"admin\" }\n",
        )?;
        Ok(ClientCa {
            issuer: rcgen::Issuer::new(params, key),
            dir,
        })
    }

    /// The spawned router's configuration: this CA trusted, the policy that grants.
    fn router_toml(&self) -> String {
        let path = |name: &str| self.dir.path().join(name).display().to_string();
        format!(
            "[auth]\nmode = \"required\"\nclient_ca = {:?}\npolicy = {:?}\n",
            path("client-ca.pem"),
            path("policy.toml")
        )
    }

    /// A connector presenting a certificate for `agent`.
    fn connector(
        &self,
        ca: &std::path::Path,
        server_name: &str,
        agent: &str,
    ) -> anyhow::Result<swarmbus_client::Connector> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, agent);
        params.subject_alt_names = vec![rcgen::SanType::URI(
            format!("swarmbus://agent/{agent}").try_into()?,
        )];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        swarmbus_client::Connector::builder(server_name)
            .trust_file(ca)
            .client_certificate_pem(cert.pem(), key.serialize_pem())
            .build()
            .with_context(|| format!("TLS setup with CA {}", ca.display()))
    }
}

/// What one worker saw.
struct Worker {
    handshakes: u64,
    errors: u64,
    first_error: Option<String>,
    latency_us: hdrhistogram::Histogram<u64>,
}

pub async fn run(args: HandshakeArgs) -> anyhow::Result<()> {
    crate::report::describe("handshakes", "connect -> Welcome");
    if args.concurrency == 0 {
        anyhow::bail!("--concurrency must be at least 1");
    }
    let client_ca = args.client_certs.then(ClientCa::new).transpose()?;
    let router_toml = client_ca.as_ref().map(ClientCa::router_toml);
    let (routers, ca, spawned) = args
        .router
        .resolve_with_config(router_toml.as_deref())
        .await?;
    let deadline = Instant::now() + args.duration;
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..args.concurrency {
        // With certificates, a worker's sessions are all its certificate's agent.
        let (connector, fixed_agent) = match &client_ca {
            Some(client_ca) => {
                let agent = format!("handshake-{w}");
                let server_name = args.router.server_name();
                (client_ca.connector(&ca, server_name, &agent)?, Some(agent))
            }
            None => (args.router.connector(&ca)?, None),
        };
        let (routers, concurrency) = (routers.clone(), args.concurrency);
        workers.spawn(async move {
            let mut seen = Worker {
                handshakes: 0,
                errors: 0,
                first_error: None,
                latency_us: latency_histogram(),
            };
            let mut i = 0u64;
            while Instant::now() < deadline {
                let agent = fixed_agent
                    .clone()
                    .unwrap_or_else(|| format!("handshake-{w}-{i}"));
                let mut session = Session::new(agent, Role::Agent, ["hs"]);
                // A router that stops answering ends the run soon after its duration.
                session.connect_timeout = Duration::from_secs(2);
                // Sessions numbered across the workers: the n-th of them all goes to
                // router n mod routers, whatever --concurrency is.
                let router = routers.pick(i as usize * concurrency + w);
                i += 1;
                let started = Instant::now();
                match connector.connect(router, session).await {
                    Ok((client, _deliveries)) => {
                        let us = started.elapsed().as_micros().max(1) as u64;
                        let _ = seen.latency_us.record(us);
                        crate::report::latency_us(us);
                        crate::report::count(1);
                        seen.handshakes += 1;
                        client.close();
                    }
                    Err(error) => {
                        seen.errors += 1;
                        seen.first_error.get_or_insert_with(|| error.to_string());
                    }
                }
            }
            seen
        });
    }
    let started = Instant::now();
    let mut handshakes = 0;
    let mut errors = 0;
    let mut first_error = None;
    let mut latency_us = latency_histogram();
    while let Some(worker) = workers.join_next().await {
        let worker = worker.context("a handshake worker failed")?;
        handshakes += worker.handshakes;
        errors += worker.errors;
        first_error = first_error.or(worker.first_error);
        latency_us
            .add(&worker.latency_us)
            .context("merging latencies")?;
    }
    let elapsed = started
        .elapsed()
        .as_secs_f64()
        .max(args.duration.as_secs_f64());
    drop(spawned);
    let per_s = (handshakes as f64 / elapsed).round();
    if args.json || crate::report::enabled() {
        let report = serde_json::json!({
            "scenario": "handshake",
            "identity": match (args.client_certs, args.router.signer().is_some()) {
                (true, _) => "certificate",
                (false, true) => "credential",
                (false, false) => "none",
            },
            "concurrency": args.concurrency,
            "duration_s": args.duration.as_secs_f64(),
            "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
            "handshakes": handshakes,
            "handshakes_per_s": per_s,
            "errors": errors,
            "first_error": first_error,
            "latency_us": latency_json(&latency_us),
        });
        crate::report::summary(&report);
        if args.json {
            println!("{report}");
        }
    }
    if !args.json {
        println!("handshakes {handshakes} ({per_s}/s), errors {errors}");
        println!(
            "connect latency p50 {} us, p99 {} us",
            latency_us.value_at_quantile(0.5),
            latency_us.value_at_quantile(0.99)
        );
        if let Some(error) = first_error {
            println!("first error: {error}");
        }
    }
    if handshakes == 0 {
        anyhow::bail!("no session was admitted");
    }
    Ok(())
}
