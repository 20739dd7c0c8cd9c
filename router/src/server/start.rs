//! Starting the router: recovery of the event log and the internal swarms, the log writers,
//! shards, runtimes and endpoints; its accessors and shutdown.

use super::*;

impl Router {
    /// Validates `config`, prepares TLS and binds the endpoint. Must be called within a
    /// tokio runtime.
    pub async fn start(config: Config) -> Result<Router, RouterError> {
        Self::start_with_clock(config, Arc::new(crate::clock::SystemClock)).await
    }

    /// [`Router::start`], reading the time at start from `clock` (tests step it to show
    /// what a clock step across a restart does). The steps, in order: the clock, the
    /// listeners (bound first, so a busy address fails the start before anything else),
    /// recovery of the event log and the internal swarms, the writers and shards, the
    /// shared context, the maintenance tasks, then the accept loops.
    pub async fn start_with_clock(
        config: Config,
        clock: Arc<dyn crate::clock::ClockSource>,
    ) -> Result<Router, RouterError> {
        Self::start_with(
            config,
            StartOptions {
                clock,
                ..StartOptions::default()
            },
        )
        .await
    }

    /// [`Router::start`] with what tests put under it: the clock it reads at start, and
    /// the disk under its event log (a [`crate::log::disk::FaultDisk`] injects write
    /// errors, slow syncs and power loss).
    pub async fn start_with(config: Config, options: StartOptions) -> Result<Router, RouterError> {
        let StartOptions { clock, disk } = options;
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir).map_err(|source| RouterError::DataDir {
            path: config.data_dir.clone(),
            context: "creating it",
            source,
        })?;
        // First, so that /readyz answers "starting" while the log is recovered.
        let admin_state = admin::AdminState::new();
        let admin = admin::start_admin(&config, &admin_state)?;
        let auth = crate::auth::Authenticator::start(&config.auth, &config.data_dir, true)?;
        let (router_clock, clock_checkpoints) = start_clock(&config, clock)?;
        let listeners = bind_listeners(
            &config,
            auth.as_ref()
                .and_then(crate::auth::Authenticator::client_verifier),
        )?;
        let recovered = recover(&config, &router_clock.clock)?;
        let cluster = match config.log.backend {
            LogBackendKind::Jetstream => Some(connect_cluster(&config, &recovered.logs).await?),
            LogBackendKind::Embedded => None,
        };
        let clock = router_clock.clock;
        let stats = Arc::new(Stats::default());
        let started = start_shards(&config, recovered.logs, cluster, clock, &stats, disk)?;
        let writer_kind = started.writer_kind;
        let context = shared_context(
            config,
            auth,
            started,
            recovered.state,
            listeners.bulk_port,
            clock,
            &stats,
        );
        // On a cluster the pauses and stops come from the cluster's safety bucket instead,
        // all applied before the first client is taken.
        let paused = match &context.cluster_safety {
            Some(bucket) => {
                let records = bucket
                    .snapshot()
                    .await
                    .map_err(|source| RouterError::JetStream { source })?;
                for (key, payload, revision) in records {
                    apply_cluster_safety_record(&context, &key, &payload, revision).await;
                }
                Vec::new()
            }
            None => recovered.paused,
        };
        for swarm in paused {
            let shard = context.shard_for(&swarm);
            let _ = shard
                .send(ShardCommand::Pause {
                    swarm,
                    paused: true,
                })
                .await;
        }
        spawn_maintenance(&context);
        admin_state.set_context(&context);
        let Listeners {
            endpoint,
            endpoint_config,
            server_config,
            bulk_socket,
            local_addr,
            ca_path,
            served_tls,
            ..
        } = listeners;
        let bulk_listener = match bulk_socket {
            Some(socket) => Some(start_bulk_listener(
                &context,
                socket,
                endpoint_config,
                server_config,
            )?),
            None => None,
        };
        let accept_task = tokio::spawn(accept_loop(
            endpoint.clone(),
            context.clone(),
            Listener::Main,
        ));
        info!(%local_addr, "router listening");
        admin_state.set_phase(admin::Phase::Ready);
        Ok(Router {
            admin,
            admin_state,
            context,
            endpoint,
            local_addr,
            ca_path,
            stats,
            accept_task,
            bulk_listener,
            served_tls: Mutex::new(served_tls),
            recovery_notes: recovered.notes,
            writer_kind,
            clock_checkpoints: Some(clock_checkpoints),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The development CA clients should trust, when the router runs on one.
    pub fn ca_path(&self) -> Option<&std::path::Path> {
        self.ca_path.as_deref()
    }

    /// What recovery repaired (torn tails truncated) or found damaged at start-up.
    pub fn recovery_notes(&self) -> &[RecoveryNote] {
        &self.recovery_notes
    }

    /// The event log writer backend in use (`Uring` or `File`).
    pub fn writer_kind(&self) -> WriterKind {
        self.writer_kind
    }

    /// Requests to worker nodes awaiting their replies.
    pub fn worker_requests_pending(&self) -> usize {
        self.context.workers().pending_requests()
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// What the job queue holds now.
    pub fn job_counts(&self) -> JobCounts {
        self.context.jobs().counts()
    }

    /// Closes every connection with `ShuttingDown` and waits (up to 5 s) for the peers to
    /// be told. From its start `/readyz` answers "shutting down"; the admin listener goes on
    /// answering so until the returned [`Stopped`] is dropped (a process holds it until it
    /// exits, so that a probe never mistakes the end for a hang).
    pub async fn shutdown(mut self) -> Stopped {
        self.admin_state.set_phase(admin::Phase::ShuttingDown);
        self.context.shutting_down.store(true, Ordering::Release);
        let code = VarInt::from(ErrorCode::ShuttingDown.as_u16());
        self.endpoint.close(code, b"router shutting down");
        self.accept_task.abort();
        if let Some((endpoint, _, task)) = &self.bulk_listener {
            endpoint.close(code, b"router shutting down");
            task.abort();
        }
        // Waiting for idle endpoints lets the peers receive the close (and reconnect at once
        // rather than time out). The bulk endpoint gets a short grace only: its driver runs
        // on the niced bulk threads, which a reconnecting crowd can starve, and a session's
        // client learns of the end from its main connection anyway.
        let bulk = async {
            if let Some((endpoint, _, _)) = &self.bulk_listener {
                let _ = tokio::time::timeout(BULK_SHUTDOWN_GRACE, endpoint.wait_idle()).await;
            }
        };
        let main = tokio::time::timeout(Duration::from_secs(5), self.endpoint.wait_idle());
        let _ = tokio::join!(main, bulk);
        if let Some((stop, thread)) = self.clock_checkpoints.take() {
            // The last checkpoint, after the connections closed, before the next router on
            // this data directory may start.
            drop(stop);
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        Stopped {
            _admin: self.admin.take(),
        }
    }

    /// Reads the trusted keys, the revocations, the policy and the client CA and CRLs again
    /// (the paths in the configuration it started with) and re-checks every live session:
    /// one whose credential is no longer trusted or is revoked, or whose client certificate
    /// is revoked or no longer signed by a trusted CA, is closed with `Unauthenticated`;
    /// one no longer granted its role in its swarms, with `Forbidden`; the subscriptions the
    /// policy now denies are dropped (each with a notice to its session). Returns how many
    /// sessions were closed. A reload that fails (a key or file that cannot be read)
    /// changes nothing. Must be called within the router's tokio runtime.
    pub fn reload_auth(&self) -> Result<usize, RouterError> {
        let context = &self.context;
        let Some(fresh) = crate::auth::Authenticator::start(
            &context.config.auth,
            &context.config.data_dir,
            false,
        )?
        else {
            return Ok(0);
        };
        let fresh = Arc::new(fresh);
        if let Some(verifier) = fresh.client_verifier() {
            // New handshakes are verified against the new client CA and CRLs.
            let served = self.served_tls.lock().unwrap_or_else(|p| p.into_inner());
            self.serve_tls(&served, Some(verifier))?;
        }
        context
            .policy_active
            .store(!fresh.policy.is_empty(), Ordering::Relaxed);
        *context.auth.write().unwrap_or_else(|p| p.into_inner()) = Some(fresh.clone());
        let sessions: Vec<Arc<Session>> = {
            let mut live = context
                .credentialed
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            live.retain(|_, session| session.strong_count() > 0);
            live.values().filter_map(std::sync::Weak::upgrade).collect()
        };
        let mut closed = 0;
        for session in sessions {
            let proof = session
                .credential
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|credential| credential.proof.clone());
            // Not yet verified (its Hello re-checks it), or closing already.
            let Some(proof) = proof else { continue };
            if session.outbox.is_closed() {
                continue;
            }
            if let Err(refusal) = session.still_allowed(&fresh, &proof) {
                tracing::info!(agent = %session.agent, reason = %refusal.reason, "closing a session no longer accepted");
                session.outbox.request_close(refusal.code);
                closed += 1;
                continue;
            }
            let dropped = session.drop_denied_subscriptions();
            if !dropped.is_empty() {
                tracing::info!(agent = %session.agent, dropped = dropped.len(), "dropping subscriptions the policy now denies");
                tokio::spawn(async move {
                    for subscription in dropped {
                        let swarm = subscription.swarm.clone();
                        let outbox = session.outbox.clone();
                        let command = ShardCommand::Unsubscribe {
                            outbox,
                            subscription,
                        };
                        session.to_shard(&swarm, command).await;
                    }
                });
            }
        }
        Ok(closed)
    }

    /// Reads the server certificate and key again (`tls.cert`, `tls.key`) and serves them to
    /// new connections on both listeners; connections made before keep theirs. Returns
    /// whether there was anything to reload (not with the development CA, whose files the
    /// router itself made). A reload that fails changes nothing.
    pub fn reload_tls(&self) -> Result<bool, RouterError> {
        let config = &self.context.config;
        let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) else {
            return Ok(false);
        };
        let fresh = tls::ServerIdentity::load(cert, key)?;
        let verifier = self
            .context
            .authenticator()
            .and_then(|auth| auth.client_verifier());
        let mut served = self.served_tls.lock().unwrap_or_else(|p| p.into_inner());
        self.serve_tls(&fresh, verifier)?;
        *served = fresh;
        Ok(true)
    }

    /// Serves `identity` (and verifies client certificates with `clients`) on both
    /// listeners, to connections from now on; changes nothing when a configuration cannot
    /// be made.
    fn serve_tls(
        &self,
        identity: &tls::ServerIdentity,
        clients: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    ) -> Result<(), RouterError> {
        let config = &self.context.config;
        let with = |listener| -> Result<quinn::ServerConfig, RouterError> {
            let mut server = tls::server_config(identity, clients.clone())?;
            server.transport_config(Arc::new(transport_config(config, listener)));
            Ok(server)
        };
        let main = with(Listener::Main)?;
        let bulk = with(Listener::Bulk)?;
        self.endpoint.set_server_config(Some(main));
        if let Some((endpoint, _, _)) = &self.bulk_listener {
            endpoint.set_server_config(Some(bulk));
        }
        Ok(())
    }

    /// Whether sessions must show a credential (`auth.mode`).
    pub fn auth_mode(&self) -> crate::auth::AuthMode {
        self.context.config.auth.mode
    }

    /// The admin listener's address (with the port the OS picked), unless `admin_listen` is
    /// `off`.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(addr, _)| *addr)
    }

    /// The bulk listener's address (with the port the OS picked), when `bulk_listen` is set.
    pub fn bulk_addr(&self) -> Option<SocketAddr> {
        self.bulk_listener.as_ref().map(|(_, addr, _)| *addr)
    }
}

/// The bound address of the bulk listener's socket.
pub(super) fn config_bulk_addr(
    socket: &std::net::UdpSocket,
    config: &Config,
) -> Result<SocketAddr, RouterError> {
    socket.local_addr().map_err(|source| RouterError::Bind {
        addr: config.bulk_listen_addr().unwrap_or(config.listen),
        source,
    })
}

pub(super) fn transport_config(config: &Config, listener: Listener) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    // Streams per connection: one session stream, one uni stream per class, plus slack.
    transport.max_concurrent_bidi_streams(VarInt::from_u32(4));
    transport.max_concurrent_uni_streams(VarInt::from_u32(16));
    // Windows sized for bursts of fan-out on a LAN/loopback hop.
    // Inbound windows bound what a connection can make the router buffer before it reads;
    // they are what holds a flooding sender back once the router stops reading it.
    let limits = &config.limits;
    let (connection_window, stream_window) = match listener {
        Listener::Main => (
            limits.receive_window_bytes,
            limits.stream_receive_window_bytes,
        ),
        Listener::Bulk => (
            limits.bulk_receive_window_bytes,
            limits.bulk_stream_receive_window_bytes,
        ),
    };
    transport.stream_receive_window(VarInt::from_u32(stream_window));
    transport.receive_window(VarInt::from_u32(connection_window));
    transport.send_window(16 << 20);
    // Ask the peer to acknowledge every 16th packet (or after 5 ms) instead of every
    // second: a fan-out hop sends many small packets, and the ACKs it gets back cost as much
    // CPU and softirq time as the data.
    let mut ack_frequency = quinn::AckFrequencyConfig::default();
    ack_frequency
        .ack_eliciting_threshold(VarInt::from_u32(15))
        .max_ack_delay(Some(Duration::from_millis(5)));
    transport.ack_frequency_config(Some(ack_frequency));
    let idle = Duration::from_millis(config.limits.idle_timeout_ms);
    transport.max_idle_timeout(idle.try_into().ok());
    transport
}

pub(super) async fn accept_loop(
    endpoint: quinn::Endpoint,
    context: Arc<Context>,
    listener: Listener,
) {
    while let Some(incoming) = endpoint.accept().await {
        let context = context.clone();
        let conn = ConnId(context.next_conn.fetch_add(1, Ordering::Relaxed));
        let span = tracing::debug_span!("conn", id = conn.0, remote = %incoming.remote_address());
        tokio::spawn(
            async move {
                match incoming.await {
                    Ok(connection) => run_connection(conn, connection, context, listener).await,
                    // Handshake failures (wrong ALPN, bad TLS) end here.
                    Err(error) => debug!(%error, "handshake failed"),
                }
            }
            .instrument(span),
        );
    }
}

/// The router's clock, started from its checkpoint, and the thread that keeps the
/// checkpoint (its stop sender and handle).
type ClockCheckpoints = (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>);

fn start_clock(
    config: &Config,
    clock: Arc<dyn crate::clock::ClockSource>,
) -> Result<(Arc<crate::clock::RouterClock>, ClockCheckpoints), RouterError> {
    let clock_path = config.data_dir.join("clock");
    let router_clock =
        crate::clock::RouterClock::start(&clock_path, clock, config.clock.max_restart_step_ms);
    match router_clock.started {
        crate::clock::Started::SameBoot {
            stepped_ms,
            bounded: true,
        } => tracing::warn!(
            stepped_ms,
            max_restart_step_ms = config.clock.max_restart_step_ms,
            "the wall clock moved while the router was down; the router's clock moved by at most max_restart_step_ms"
        ),
        crate::clock::Started::Rebooted { behind_ms } if behind_ms > 0 => tracing::warn!(
            behind_ms,
            "the wall clock is behind the router's last checkpoint; the router's clock starts at the checkpoint"
        ),
        _ => {}
    }
    let router_clock = Arc::new(router_clock);
    let (clock_stop, clock_stopped) = std::sync::mpsc::channel();
    let clock_thread = router_clock
        .keep_checkpoint(clock_stopped)
        .map_err(|source| RouterError::DataDir {
            path: clock_path.clone(),
            context: "starting the clock checkpoint thread",
            source,
        })?;
    Ok((router_clock, (clock_stop, clock_thread)))
}

/// The main endpoint, bound, and the bulk listener's socket, bound (its endpoint is made
/// on the bulk runtime once that runs).
struct Listeners {
    endpoint: quinn::Endpoint,
    endpoint_config: quinn::EndpointConfig,
    server_config: quinn::ServerConfig,
    bulk_socket: Option<std::net::UdpSocket>,
    /// The port sessions are offered for their bulk connection, if any.
    bulk_port: Option<u16>,
    local_addr: SocketAddr,
    ca_path: Option<PathBuf>,
    served_tls: tls::ServerIdentity,
}

fn bind_listeners(
    config: &Config,
    clients: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Result<Listeners, RouterError> {
    let (cert, key, ca_path) = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone(), None),
        _ => {
            let paths = tls::ensure_dev_tls(&config.data_dir)?;
            (paths.server_cert, paths.server_key, Some(paths.ca_cert))
        }
    };
    let served_tls = tls::ServerIdentity::load(&cert, &key)?;
    let mut server_config = tls::server_config(&served_tls, clients)?;
    server_config.transport_config(Arc::new(transport_config(config, Listener::Main)));
    let bind_error = |source: std::io::Error| RouterError::Bind {
        addr: config.listen,
        source,
    };
    let (reset_key, cid_key) = tls::stateless_reset_key(&config.data_dir)?;
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    // Stateless resets tell clients of the previous process at once that it is gone;
    // quinn's default spacing (20 ms) would take 20 s to reach 1,000 of them.
    endpoint_config.min_reset_interval(Duration::from_millis(1));
    let socket = std::net::UdpSocket::bind(config.listen).map_err(bind_error)?;
    // Bound now, so a busy address fails the start before anything else; the endpoint
    // is made on the bulk runtime once it runs.
    let bulk_socket = match config.bulk_listen_addr() {
        Some(addr) => Some(
            std::net::UdpSocket::bind(addr).map_err(|source| RouterError::Bind { addr, source })?,
        ),
        None => None,
    };
    // Clients attach at the offered port on the address they reached the router at, so
    // bulk connections are offered only when both listeners share their address.
    let bulk_port = match &bulk_socket {
        Some(bulk_socket) => {
            let bulk_addr = config_bulk_addr(bulk_socket, config)?;
            let main_ip = socket.local_addr().map_err(bind_error)?.ip();
            if bulk_addr.ip() == main_ip {
                Some(bulk_addr.port())
            } else {
                tracing::warn!(
                    %bulk_addr, %main_ip,
                    "the bulk listener's address differs from listen's: sessions are not offered bulk connections (clients may still connect to it directly)"
                );
                None
            }
        }
        None => None,
    };
    let endpoint = quinn::Endpoint::new(
        endpoint_config.clone(),
        Some(server_config.clone()),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind_error)?;
    let local_addr = endpoint.local_addr().map_err(|source| RouterError::Bind {
        addr: config.listen,
        source,
    })?;
    Ok(Listeners {
        endpoint,
        endpoint_config,
        server_config,
        bulk_socket,
        bulk_port,
        local_addr,
        ca_path,
        served_tls,
    })
}

/// What the router recovered at start: the swarms' logs (for the shards), the control
/// plane, job queue and worker registry restored from the internal swarms, and the swarms
/// to pause again.
struct Recovered {
    logs: Vec<log::SwarmLog>,
    notes: Vec<RecoveryNote>,
    state: RestoredState,
    paused: Vec<String>,
}

/// The internal swarms' state, read back.
struct RestoredState {
    workers: Workers,
    jobs: Jobs,
    control: ControlState,
}

/// Recovers every swarm's log before anyone is accepted: sequencers continue after the last
/// durable op, and the internal swarms give back leases, stops, pauses, drains, pins and
/// jobs.
fn recover(config: &Config, clock: &Clock) -> Result<Recovered, RouterError> {
    // Recover every swarm's log before accepting anyone: sequencers continue after the
    // last durable op.
    let log_dir = config.data_dir.join("log");
    let (recovered, recovery_notes) =
        // Only a router that syncs before it acknowledges keeps watermarks up to date.
        log::store::recover_all_with(&log_dir, config.log.sync == log::SyncPolicy::Always)
            .map_err(|source| RouterError::DataDir {
            path: log_dir.clone(),
            context: "recovering the event log",
            source,
        })?;
    check_internal_logs(&recovered)?;
    let unknown_lease_ttl_ms = u64::from(config.presence.max_lease_ttl_ms);
    let lease_limits = LeaseLimits {
        max_leases: config.limits.max_leases as usize,
        max_held_per_agent: config.limits.max_leases_per_agent as usize,
    };
    let mut workers = Workers::new(config.affinity.clone(), read_pins(&recovered)?, clock.now());
    let mut restored = Restored::default();
    for (key, payload) in read_records(&recovered, CONTROL_SWARM)? {
        restored.apply(&key, &payload);
    }
    for node in &restored.drained {
        workers.set_admin_drain(node, true);
    }
    let (job_records, spec_ops) = read_job_records(&recovered)?;
    let mut jobs = Jobs::new(
        config.jobs.clone(),
        job_records,
        clock.now_ms(),
        log::store::new_epoch().0,
    );
    jobs.restored_spec_ops(&spec_ops);
    jobs.logs_exist(
        recovered
            .iter()
            .filter(|log| log.name.starts_with(JOBS_SWARM_PREFIX))
            .map(|log| log.name.clone()),
    );
    let mut control = ControlState {
        presence: Presence::default(),
        leases: Leases::restore(
            restored.leases,
            clock.now_ms(),
            unknown_lease_ttl_ms,
            lease_limits,
        ),
        stops: Stops::default(),
    };
    for (agent, until) in restored.stops {
        control.stops.stop(&agent, until);
    }
    Ok(Recovered {
        logs: recovered,
        notes: recovery_notes,
        state: RestoredState {
            workers,
            jobs,
            control,
        },
        paused: restored.paused,
    })
}

/// Bytes a logged record takes besides its payload, at most: the Deliver head (names,
/// key, ids: bounded by the schema) with its length prefix, and the record's own header
/// with its copy of the key.
const RECORD_HEAD_ALLOWANCE: usize = swarmbus_schema::MAX_DELIVER_HEADER_BYTES
    + 4
    + log::record::RECORD_HEADER_BYTES
    + swarmbus_schema::MAX_NAME_BYTES;

/// With `log.backend = "jetstream"`: the cluster, and the swarms its streams hold. The
/// embedded log must hold none of the swarms' logs (they would be hidden, not moved).
/// What `connect_cluster` brings: the cluster, its swarms, and the telemetry connection
/// (with `jetstream.share_telemetry`).
struct ClusterStart {
    cluster: swarmbus_jetstream::Cluster,
    leases: swarmbus_jetstream::LeaseBucket,
    safety: swarmbus_jetstream::SafetyBucket,
    swarms: Vec<swarmbus_jetstream::SwarmInfo>,
    telemetry: Option<async_nats::Client>,
}

/// Messages one telemetry subscription holds before NATS drops more for it.
const TELEMETRY_SUBSCRIPTION_CAPACITY: usize = 4096;

async fn connect_cluster(
    config: &Config,
    recovered: &[log::SwarmLog],
) -> Result<ClusterStart, RouterError> {
    let embedded: Vec<&str> = recovered
        .iter()
        .filter(|log| !log.is_internal())
        .map(|log| log.name.as_str())
        .collect();
    if !embedded.is_empty() {
        return Err(RouterError::Config {
            detail: format!(
                "log.backend = \"jetstream\", but the embedded log under {} holds the logs of \
                 {} swarm(s) ({}...): the router would not serve them; move their data \
                 directory away, or run with log.backend = \"embedded\"",
                config.data_dir.join("log").display(),
                embedded.len(),
                embedded[0],
            ),
        });
    }
    let cluster = swarmbus_jetstream::Cluster::connect(config.jetstream.clone())
        .await
        .map_err(|source| RouterError::JetStream { source })?;
    // The largest command or control record, with room for its Deliver head (names, key)
    // and the append's headers, must fit in one NATS message: a larger one would make the
    // server close the connection every swarm shares.
    let payloads = &config.limits.max_payload_bytes;
    let largest = payloads.command.max(payloads.control) as usize
        + RECORD_HEAD_ALLOWANCE
        + swarmbus_jetstream::HEADER_ALLOWANCE;
    if cluster.max_payload() > 0 && largest > cluster.max_payload() {
        return Err(RouterError::Config {
            detail: format!(
                "the NATS server takes messages of at most {} bytes (its max_payload), smaller \
                 than the largest command or control record ({largest} bytes with \
                 limits.max_payload_bytes.command = {} and .control = {}): raise the server's \
                 max_payload or lower those limits",
                cluster.max_payload(),
                payloads.command,
                payloads.control,
            ),
        });
    }
    let swarms = cluster
        .swarms()
        .await
        .map_err(|source| RouterError::JetStream { source })?;
    info!(urls = ?config.jetstream.urls, swarms = swarms.len(), replicas = config.jetstream.replicas, "JetStream log backend ready");
    let telemetry = match config.jetstream.share_telemetry {
        true => Some(
            cluster
                .connect_telemetry(TELEMETRY_SUBSCRIPTION_CAPACITY)
                .await
                .map_err(|source| RouterError::JetStream { source })?,
        ),
        false => None,
    };
    let leases = cluster
        .lease_bucket()
        .await
        .map_err(|source| RouterError::JetStream { source })?;
    let safety = cluster
        .safety_bucket()
        .await
        .map_err(|source| RouterError::JetStream { source })?;
    Ok(ClusterStart {
        cluster,
        leases,
        safety,
        swarms,
        telemetry,
    })
}

/// The shards (main ones, then the job queue's) and what the writers report.
struct StartedShards {
    shards: Vec<ShardSender>,
    job_shards: Vec<ShardSender>,
    bulk: BulkRuntime,
    writer_kind: WriterKind,
    /// What the two log writers measure.
    log_metrics: Vec<Arc<crate::log::writer::LogMetrics>>,
    cluster: Option<swarmbus_jetstream::Cluster>,
    cluster_leases: Option<swarmbus_jetstream::LeaseBucket>,
    cluster_safety: Option<swarmbus_jetstream::SafetyBucket>,
}

/// Starts the bulk runtime, the two log writers and the shards, each with its swarms.
// Writers, then each shard with its swarms and log: the shards are built in one pass over
// the recovered logs.
fn start_shards(
    config: &Config,
    recovered: Vec<log::SwarmLog>,
    cluster: Option<ClusterStart>,
    clock: Clock,
    stats: &Arc<Stats>,
    disk: log::disk::Disk,
) -> Result<StartedShards, RouterError> {
    let log_dir = config.data_dir.join("log");
    let shard_count = config.shard_count();
    // The job queue's swarms get shards of their own, on the bulk runtime, after the
    // main ones (their log events are numbered after the main shards').
    let job_shard_count = shard_count;
    let (event_senders, event_receivers): (Vec<_>, Vec<_>) = (0..shard_count + job_shard_count)
        .map(|_| mpsc::unbounded_channel())
        .unzip();
    let bulk = BulkRuntime::start(
        config.runtime.bulk_thread_count(),
        config.runtime.bulk_priority,
    )
    .map_err(|e| RouterError::Config {
        detail: format!("starting the bulk runtime: {e}"),
    })?;
    let start_writer = |bulk| {
        LogWriter::start(
            config.log.writer,
            config.log.sync,
            config.log.writer_queue,
            event_senders.clone(),
            bulk,
            disk.clone(),
        )
        .map_err(|e| RouterError::Config {
            detail: format!("starting the event log writer: {e}"),
        })
    };
    let writer = start_writer(None)?;
    // The job queue's records get a writer of their own, at the bulk threads' priority:
    // commands never wait for the sync of a batch of job records, nor for its thread.
    let jobs_writer = start_writer(Some(config.runtime.bulk_priority))?;
    info!(writer = %writer.kind(), sync = %config.log.sync, swarms = recovered.len(), "event log ready");
    let mut per_shard: Vec<Vec<log::SwarmLog>> = (0..shard_count + job_shard_count)
        .map(|_| Vec::new())
        .collect();
    for swarm in recovered {
        let index = if swarm.name.starts_with(JOBS_SWARM_PREFIX) {
            shard_count + shard_of(&swarm.name, job_shard_count)
        } else {
            shard_of(&swarm.name, shard_count)
        };
        per_shard[index].push(swarm);
    }
    let (cluster, cluster_leases, cluster_safety, streams, telemetry_client) = match cluster {
        Some(ClusterStart {
            cluster,
            leases,
            safety,
            swarms,
            telemetry,
        }) => (
            Some(cluster),
            Some(leases),
            Some(safety),
            Some(swarms),
            telemetry,
        ),
        None => (None, None, None, None, None),
    };
    let mut streams_per_shard: Vec<Vec<swarmbus_jetstream::SwarmInfo>> =
        (0..shard_count).map(|_| Vec::new()).collect();
    for info in streams.into_iter().flatten() {
        streams_per_shard[shard_of(&info.swarm, shard_count)].push(info);
    }
    let retention = config.log.retention();
    // One count of swarms for every shard: `limits.max_swarms` is router-wide.
    let swarm_budget = SwarmBudget::new(
        config.limits.max_swarms as usize,
        config.limits.max_swarms_per_agent as usize,
    );
    let mut shards: Vec<ShardSender> = per_shard
        .into_iter()
        .zip(event_receivers.into_iter().zip(event_senders))
        .enumerate()
        .map(|(index, (logs, (events, events_tx)))| {
            let job_shard = index >= shard_count;
            let shard_log = ShardLog::new(
                index,
                &log_dir,
                config.log.segment_bytes,
                if job_shard {
                    jobs_writer.clone()
                } else {
                    writer.clone()
                },
                logs,
                retention.clone(),
                events_tx.clone(),
            );
            let backend: Box<dyn log::LogBackend> = match &cluster {
                Some(cluster) if !job_shard => Box::new(log::jetstream::SplitLog {
                    embedded: shard_log,
                    streams: log::jetstream::JetStreamLog::new(
                        cluster.clone(),
                        std::mem::take(&mut streams_per_shard[index]),
                        events_tx,
                    ),
                }),
                _ => Box::new(shard_log),
            };
            // A shard runs on the runtime it is started from.
            let _inside = job_shard.then(|| bulk.handle().enter());
            let core_config = CoreConfig {
                swarms: swarm_budget.clone(),
                epoch_seed: log::store::new_epoch().0,
                redelivery_timeout: Duration::from_millis(config.log.redelivery_timeout_ms),
                delta_max_ops: config.log.delta_max_ops,
            };
            spawn_shard(
                config.limits.shard_queue,
                core_config,
                Duration::from_millis(config.log.compaction_interval_ms),
                backend,
                events,
                stats.clone(),
                clock,
            )
        })
        .collect();
    let job_shards = shards.split_off(shard_count);
    if let (Some(cluster), Some(client)) = (cluster.as_ref(), telemetry_client) {
        // Held weakly: the bridge's task must not keep the routes (and so itself) alive
        // after the shards are gone.
        let routes: Vec<_> = shards
            .iter()
            .map(|shard| Arc::downgrade(shard.telemetry_routes()))
            .collect();
        let (delivered, max_payload) = (stats.clone(), config.limits.max_payload_bytes.telemetry);
        let deliver: crate::bridge::Deliver = Arc::new(move |bridged: &crate::bridge::Bridged| {
            // This router's own limit: larger frames could break its clients' streams.
            if bridged.publish.payload.len() > max_payload as usize {
                delivered
                    .telemetry_bridge_rejected
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            if let Some(routes) = routes[shard_of(&bridged.publish.swarm, routes.len())].upgrade() {
                routes.deliver_bridged(&delivered, bridged);
            }
        });
        let bridge = crate::bridge::TelemetryBridge::start(client, cluster, stats.clone(), deliver);
        for shard in &shards {
            shard.telemetry_routes().set_bridge(bridge.clone());
        }
    }
    Ok(StartedShards {
        shards,
        job_shards,
        bulk,
        writer_kind: writer.kind(),
        log_metrics: vec![writer.metrics(), jobs_writer.metrics()],
        cluster,
        cluster_leases,
        cluster_safety,
    })
}

/// The context every session shares.
fn shared_context(
    config: Config,
    auth: Option<crate::auth::Authenticator>,
    started: StartedShards,
    restored: RestoredState,
    bulk_port: Option<u16>,
    clock: Clock,
    stats: &Arc<Stats>,
) -> Arc<Context> {
    let telemetry_per_s = config.rate_limits.router_telemetry_per_s;
    let telemetry_intake =
        (telemetry_per_s > 0.0).then(|| crate::intake::IntakeBudget::new(Some(telemetry_per_s)));
    let bulk_intake = config
        .governor
        .enabled
        .then(|| crate::intake::IntakeBudget::new(None));
    let partial_frames = RouterPartialFrames::new(config.limits.router_partial_frame_bytes);
    Arc::new(Context {
        decode: DecodeOptions::for_swarms_per_session(config.limits.max_swarms_per_session),
        config,
        policy_active: std::sync::atomic::AtomicBool::new(
            auth.as_ref().is_some_and(|auth| !auth.policy.is_empty()),
        ),
        auth: std::sync::RwLock::new(auth.map(Arc::new)),
        credentialed: Mutex::new(HashMap::new()),
        live: Mutex::new(std::collections::BTreeMap::new()),
        shards: started.shards,
        job_shards: started.job_shards,
        log_metrics: started.log_metrics,
        cluster: started.cluster,
        stats: stats.clone(),
        next_conn: AtomicU64::new(1),
        swarm_guards: Mutex::new(HashMap::new()),
        workers: Mutex::new(restored.workers),
        shutting_down: std::sync::atomic::AtomicBool::new(false),
        telemetry_intake,
        bulk_intake,
        bulk: started.bulk,
        bulk_port,
        attachments: Mutex::new(HashMap::new()),
        control: Mutex::new({
            let mut control = restored.control;
            if started.cluster_leases.is_some() {
                // The cluster's buckets hold the leases and the stops (mirrored as the
                // router watches them).
                control.leases.forget_all();
                control.stops.forget_all();
            }
            control
        }),
        cluster_leases: started.cluster_leases,
        cluster_safety: started.cluster_safety,
        safety_applied: tokio::sync::Mutex::new(HashMap::new()),
        clock,
        jobs: Mutex::new(restored.jobs),
        partial_frames,
    })
}

/// The router's periodic work (see [`super::maintenance`]).
fn spawn_maintenance(context: &Arc<Context>) {
    tokio::spawn(presence_maintenance(Arc::downgrade(context)));
    if let Some(bucket) = context.cluster_leases.clone() {
        tokio::spawn(mirror_cluster_leases(Arc::downgrade(context), bucket));
    }
    if let Some(bucket) = context.cluster_safety.clone() {
        tokio::spawn(apply_cluster_safety(Arc::downgrade(context), bucket));
    }
    if context.config.governor.enabled {
        tokio::spawn(govern_bulk_intake(Arc::downgrade(context)));
    }
    tokio::spawn(worker_maintenance(Arc::downgrade(context)));
    context
        .bulk
        .handle()
        .spawn(job_maintenance(Arc::downgrade(context)));
}

/// Keeps `control.leases` a mirror of the cluster's lease bucket (what stamped publishes
/// are checked against), until the router is gone.
async fn mirror_cluster_leases(
    context: std::sync::Weak<Context>,
    bucket: swarmbus_jetstream::LeaseBucket,
) {
    bucket
        .follow(|state| {
            let Some(context) = context.upgrade() else {
                return false;
            };
            let value = &state.value;
            context.control().leases.mirror(
                &value.swarm,
                &value.name,
                &value.holder,
                state.token,
                value.granted_at_ms,
                value.expires_at_ms,
                state.revision(),
            );
            true
        })
        .await;
}

/// Applies the pauses and stops of the cluster's safety bucket (those there at start, then
/// each as it is written, by this router or another), until the router is gone.
async fn apply_cluster_safety(
    context: std::sync::Weak<Context>,
    bucket: swarmbus_jetstream::SafetyBucket,
) {
    let (to, mut records) = tokio::sync::mpsc::unbounded_channel();
    let follow = tokio::spawn(async move { bucket.follow(to).await });
    while let Some((key, payload, revision)) = records.recv().await {
        let Some(context) = context.upgrade() else {
            break;
        };
        apply_cluster_safety_record(&context, &key, &payload, revision).await;
    }
    follow.abort();
}

/// Applies the safety record `key` of the cluster's write `revision`, unless a newer one
/// of that key was applied here already (the acting router applies its own write, and
/// sees it again in the watch, in either order).
pub(super) async fn apply_cluster_safety_record(
    context: &Context,
    key: &str,
    payload: &[u8],
    revision: u64,
) {
    use swarmbus_proto::control::SafetyRecord;
    let mut applied = context.safety_applied.lock().await;
    let newest = applied.entry(key.to_owned()).or_default();
    if revision <= *newest {
        return;
    }
    *newest = revision;
    match swarmbus_proto::control::parse_safety(key, payload) {
        Some(SafetyRecord::Pause { swarm, paused }) => {
            let shard = context.shard_for(&swarm);
            let _ = shard.send(ShardCommand::Pause { swarm, paused }).await;
        }
        Some(SafetyRecord::Stop { agent, until_ms }) => {
            let now_ms = context.clock.now_ms();
            if until_ms <= now_ms {
                return; // over already
            }
            let mut control = context.control();
            control.stops.stop(&agent, until_ms);
            if let Some(present) = control.presence.get(&agent) {
                present.outbox.request_close(ErrorCode::Stopped);
            }
        }
        None => tracing::warn!(%key, "a record of the safety bucket that is no pause or stop"),
    }
}

/// The bulk listener's endpoint, on the bulk runtime, and its accept loop.
fn start_bulk_listener(
    context: &Arc<Context>,
    socket: std::net::UdpSocket,
    endpoint_config: quinn::EndpointConfig,
    server_config: quinn::ServerConfig,
) -> Result<(quinn::Endpoint, SocketAddr, JoinHandle<()>), RouterError> {
    let addr = config_bulk_addr(&socket, &context.config)?;
    // quinn spawns the endpoint's driver, and each connection's, on the runtime
    // it is called from: the bulk one.
    let _inside = context.bulk.handle().enter();
    let mut server_config = server_config;
    server_config.transport_config(Arc::new(transport_config(&context.config, Listener::Bulk)));
    let bulk_endpoint = quinn::Endpoint::new(
        endpoint_config,
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| RouterError::Bind { addr, source })?;
    let task = context.bulk.handle().spawn(accept_loop(
        bulk_endpoint.clone(),
        context.clone(),
        Listener::Bulk,
    ));
    // The bulk listener lives as long as the main runtime: when that runtime
    // goes (even without a shutdown), this guard task is dropped with it and
    // closes the bulk endpoint and its accept loop.
    let guard = (bulk_endpoint.clone(), task.abort_handle());
    tokio::spawn(async move {
        struct Guard(quinn::Endpoint, tokio::task::AbortHandle);
        impl Drop for Guard {
            fn drop(&mut self) {
                self.1.abort();
                self.0.close(VarInt::from_u32(0), b"router stopped");
            }
        }
        let _guard = Guard(guard.0, guard.1);
        std::future::pending::<()>().await
    });
    info!(%addr, "bulk listener ready");
    Ok((bulk_endpoint, addr, task))
}

/// What [`Router::start_with`] starts a router with besides its configuration.
#[derive(Clone, Debug)]
pub struct StartOptions {
    /// The time at start (default: the system clock).
    pub clock: Arc<dyn crate::clock::ClockSource>,
    /// The disk under the event log (default: the real one).
    pub disk: log::disk::Disk,
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions {
            clock: Arc::new(crate::clock::SystemClock),
            disk: log::disk::Disk::real(),
        }
    }
}
