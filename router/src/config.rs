//! Typed configuration with documented defaults.
//!
//! Sources, later ones winning: embedded defaults, the TOML file (`--config FILE`),
//! `SWARMBUS_*` environment variables, command-line flags. `router/swarmbus.example.toml`
//! documents every key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use swarmbus_schema::{valid_name, Class, Role, MAX_NAME_BYTES};

use std::collections::HashMap;

use crate::error::RouterError;
use crate::log::{SyncPolicy, WriterKind};
use swarmbus_proto::limits::{BreakerConfig, Rate};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:4433";
pub const DEFAULT_DATA_DIR: &str = "./swarmbus-data";

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// UDP address of the QUIC endpoint. Loopback only until authentication lands.
    pub listen: SocketAddr,
    /// A second QUIC endpoint on the bulk runtime: sessions on the main listener attach
    /// their bulk connections (telemetry and jobs) to it, and sessions that connect to it
    /// directly run there entirely (their connection's driver included). Default `auto`:
    /// `listen`'s address, a port the OS picks; `off`: none, and no session is offered a
    /// bulk connection.
    pub bulk_listen: BulkListen,
    /// The admin listener (HTTP: `/metrics`, `/healthz`, `/readyz`): a loopback TCP address
    /// (default 127.0.0.1:9464; port 0: one the OS picks), or `off`.
    pub admin_listen: AdminListen,
    /// Whether `/metrics`, `/healthz` and `/readyz` answer without a credential (default
    /// true: scrapers and probes on the host need none). False: with
    /// `auth.mode = "required"` they need the admin credential the JSON views need.
    pub admin_metrics_open: bool,
    /// Directory for the router's state (development TLS material now; the event log later).
    pub data_dir: PathBuf,
    /// Name announced in Welcome.
    pub router_name: String,
    /// Routing shards (swarms are spread over them by hash); 0 = one per CPU core.
    pub shards: usize,
    pub tls: TlsConfig,
    pub auth: crate::auth::AuthConfig,
    pub limits: LimitsConfig,
    pub queues: QueueConfig,
    pub log: LogConfig,
    /// The NATS JetStream cluster, used when `log.backend = "jetstream"`.
    pub jetstream: swarmbus_jetstream::JetStreamConfig,
    pub rate_limits: RateLimitsConfig,
    pub affinity: swarmbus_proto::workers::AffinityConfig,
    pub presence: swarmbus_proto::control::PresenceConfig,
    pub jobs: swarmbus_proto::jobs::JobsConfig,
    pub runtime: RuntimeConfig,
    pub governor: swarmbus_proto::governor::GovernorConfig,
    pub clock: ClockConfig,
}

/// `[clock]`: the router's clock across restarts (see [`crate::clock`]).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClockConfig {
    /// When the router restarts on the same boot of its host, how far its clock may differ
    /// from the time that really passed (measured by the boot clock): a wall-clock step
    /// while it was down moves the router's clock by at most this much.
    pub max_restart_step_ms: u64,
}

impl Default for ClockConfig {
    fn default() -> Self {
        ClockConfig {
            max_restart_step_ms: 60_000,
        }
    }
}

/// The router's threads (see [`crate::bulk`]).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads of the bulk runtime, which reads and writes telemetry and job
    /// streams; 0 = one per CPU core.
    pub bulk_threads: usize,
    /// How the kernel schedules the bulk threads against the main runtime's.
    pub bulk_priority: BulkPriority,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            bulk_threads: 0,
            bulk_priority: BulkPriority::Nice(10),
        }
    }
}

/// Where the bulk listener listens (`bulk_listen`).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(try_from = "String", into = "String")]
pub enum BulkListen {
    /// `listen`'s IP address and a port the OS picks (announced in Welcome).
    Auto,
    /// No bulk listener.
    Off,
    At(SocketAddr),
}

impl std::str::FromStr for BulkListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BulkListen::Auto),
            "off" => Ok(BulkListen::Off),
            other => other.parse().map(BulkListen::At).map_err(|_| {
                format!("bulk_listen {other:?}: expected auto, off or an address (IP:PORT)")
            }),
        }
    }
}

impl From<BulkListen> for String {
    fn from(value: BulkListen) -> String {
        match value {
            BulkListen::Auto => "auto".into(),
            BulkListen::Off => "off".into(),
            BulkListen::At(addr) => addr.to_string(),
        }
    }
}

impl TryFrom<String> for BulkListen {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

/// An environment variable's value: a TOML value when it parses as one (a number, a
/// boolean, an array, an inline table, a quoted string), else the text as a string.
fn env_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut table| table.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_owned()))
}

/// Sets `table`'s key at `path` (tables made as needed) to `value`.
fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("no key".into());
    };
    let mut at = table;
    for part in parents {
        let entry = at
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        at = entry
            .as_table_mut()
            .ok_or_else(|| format!("{part} is not a section"))?;
    }
    at.insert(last.clone(), value);
    Ok(())
}

/// Where the admin listener listens (`admin_listen`).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(try_from = "String", into = "String")]
pub enum AdminListen {
    Off,
    At(SocketAddr),
}

/// `admin_listen` unless set.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";

impl std::str::FromStr for AdminListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(AdminListen::Off),
            other => other.parse().map(AdminListen::At).map_err(|_| {
                format!("admin_listen {other:?}: expected off or an address (IP:PORT)")
            }),
        }
    }
}

impl From<AdminListen> for String {
    fn from(value: AdminListen) -> String {
        match value {
            AdminListen::Off => "off".into(),
            AdminListen::At(addr) => addr.to_string(),
        }
    }
}

impl TryFrom<String> for AdminListen {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

/// Scheduling of the bulk threads (Linux; elsewhere they run like the others).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(try_from = "String", into = "String")]
pub enum BulkPriority {
    /// A nice value from 0 (the same footing as commands) to 19: bulk work gets a smaller
    /// share of a busy CPU (nice 10, the default: about a tenth against one busy main
    /// thread). Not `SCHED_IDLE`: bulk and main threads share locks (a QUIC connection's
    /// state, an outbox lane), and a bulk thread starved while holding one would stall the
    /// main runtime (measured: flood p99 up to 116 ms).
    Nice(i32),
    /// No bulk threads: telemetry and job streams share the main runtime with commands.
    Shared,
}

impl std::str::FromStr for BulkPriority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "shared" => Ok(BulkPriority::Shared),
            other => match other.strip_prefix("nice:").map(str::parse::<i32>) {
                Some(Ok(n)) if (0..=19).contains(&n) => Ok(BulkPriority::Nice(n)),
                _ => Err(format!(
                    "runtime.bulk_priority {other:?}: expected nice:N (N from 0 to 19) or shared"
                )),
            },
        }
    }
}

impl From<BulkPriority> for String {
    fn from(value: BulkPriority) -> String {
        value.to_string()
    }
}

impl TryFrom<String> for BulkPriority {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl std::fmt::Display for BulkPriority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BulkPriority::Nice(n) => write!(f, "nice:{n}"),
            BulkPriority::Shared => f.write_str("shared"),
        }
    }
}

impl RuntimeConfig {
    pub fn bulk_thread_count(&self) -> usize {
        if self.bulk_threads > 0 {
            self.bulk_threads
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }
}

/// Per-session token buckets, one per class (see [`swarmbus_proto::limits`]).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitsConfig {
    pub control: Rate,
    pub command: Rate,
    pub alert: Rate,
    pub reconciliation: Rate,
    pub telemetry: Rate,
    /// Overrides per role (`agent`, `controller`, `worker`).
    pub roles: HashMap<String, RoleRates>,
    /// Overrides per swarm (and per role within a swarm); they win over `roles`.
    pub swarms: HashMap<String, SwarmRates>,
    /// The per-session circuit breaker.
    pub breaker: BreakerConfig,
    /// The per-swarm circuit breaker: refusals of all the swarm's sessions add up.
    pub swarm_breaker: BreakerConfig,
    /// Telemetry messages the whole router reads per second (0: no limit). Above it,
    /// telemetry publish streams are not read on, so QUIC flow control holds the senders
    /// back instead of the router spending CPU on a flood it would shed.
    pub router_telemetry_per_s: f64,
}

/// Rate overrides of one swarm: for every role, then per role.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SwarmRates {
    pub control: Option<Rate>,
    pub command: Option<Rate>,
    pub alert: Option<Rate>,
    pub reconciliation: Option<Rate>,
    pub telemetry: Option<Rate>,
    pub roles: HashMap<String, RoleRates>,
}

/// Rate overrides of one role; unset classes keep the defaults.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RoleRates {
    pub control: Option<Rate>,
    pub command: Option<Rate>,
    pub alert: Option<Rate>,
    pub reconciliation: Option<Rate>,
    pub telemetry: Option<Rate>,
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        RateLimitsConfig {
            control: Rate::new(1_000.0, 2_000.0),
            command: Rate::new(100_000.0, 200_000.0),
            alert: Rate::new(1_000.0, 2_000.0),
            reconciliation: Rate::new(1_000.0, 2_000.0),
            telemetry: Rate::new(500_000.0, 1_000_000.0),
            roles: HashMap::new(),
            swarms: HashMap::new(),
            breaker: BreakerConfig::default(),
            swarm_breaker: BreakerConfig::swarm_default(),
            router_telemetry_per_s: 0.0,
        }
    }
}

impl RoleRates {
    fn as_array(&self) -> [Option<Rate>; Class::COUNT] {
        [
            self.control,
            self.command,
            self.alert,
            self.reconciliation,
            self.telemetry,
        ]
    }
}

impl RateLimitsConfig {
    /// The rates of a session of `role`, indexed by [`Class::index`].
    pub fn rates_for(&self, role: Role) -> [Rate; Class::COUNT] {
        let defaults = [
            self.control,
            self.command,
            self.alert,
            self.reconciliation,
            self.telemetry,
        ];
        let role = self.roles.get(role.name()).cloned().unwrap_or_default();
        let overrides = role.as_array();
        std::array::from_fn(|i| overrides[i].unwrap_or(defaults[i]))
    }

    /// The rates of a session of `role` in `swarm` when that swarm has overrides (`None`
    /// when it has none: the session's own rates apply). Most specific wins:
    /// `swarms.S.roles.R`, then `swarms.S`, then `roles.R`, then the defaults.
    pub fn swarm_rates_for(&self, swarm: &str, role: Role) -> Option<[Rate; Class::COUNT]> {
        let swarm_rates = self.swarms.get(swarm)?;
        let base = self.rates_for(role);
        let for_swarm = [
            swarm_rates.control,
            swarm_rates.command,
            swarm_rates.alert,
            swarm_rates.reconciliation,
            swarm_rates.telemetry,
        ];
        let for_role = swarm_rates
            .roles
            .get(role.name())
            .cloned()
            .unwrap_or_default()
            .as_array();
        Some(std::array::from_fn(|i| {
            for_role[i].or(for_swarm[i]).unwrap_or(base[i])
        }))
    }
}

/// The embedded event log.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Where the swarms' ordered logs live: `embedded` (files under `data_dir`, the
    /// default) or `jetstream` (a stream per swarm on the `[jetstream]` cluster; the
    /// router's own swarms stay embedded).
    pub backend: LogBackendKind,
    /// `always` (fdatasync before acknowledging), `interval_ms:N` or `never_danger`.
    pub sync: SyncPolicy,
    /// Writer backend: `auto` (io_uring when the kernel allows, else plain file I/O),
    /// `uring` (fail to start without it) or `file`.
    pub writer: WriterKind,
    /// A segment file is closed and a new one started past this many bytes.
    pub segment_bytes: u64,
    /// Appends queued to the writer thread before shards wait.
    pub writer_queue: usize,
    /// A command or control op delivered but not acknowledged for this long is sent again
    /// (from the subscriber's last acknowledged op on).
    pub redelivery_timeout_ms: u64,
    /// Most ops one DeltaRequest is answered with.
    pub delta_max_ops: u64,
    /// DeltaRequests one session may make per second; more are refused with Busy.
    pub delta_requests_per_s: u32,
    /// How often each shard compacts its swarms' logs and applies retention.
    pub compaction_interval_ms: u64,
    /// The newest bytes of each swarm's log that are never compacted.
    pub hot_bytes: u64,
    /// Compaction drops command records older than this (0: keep them).
    pub command_max_age_ms: u64,
    /// Compaction drops control records older than this (0: keep them).
    pub control_max_age_ms: u64,
    /// Past this size a swarm's oldest segments are deleted (0: no limit).
    pub max_bytes: u64,
    /// The router's own log lines on stderr (not the event log): `text` (the default) or
    /// `json` (one JSON object per line, for log collectors).
    pub format: LogFormat,
}

/// `log.backend`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogBackendKind {
    #[default]
    Embedded,
    Jetstream,
}

/// How the router writes its log lines (`log.format`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log.format {other:?}: expected text or json")),
        }
    }
}

impl LogConfig {
    /// The retention settings in the log's terms.
    pub fn retention(&self) -> crate::log::Retention {
        let mut max_age_ms = [None; Class::COUNT];
        max_age_ms[Class::Command.index()] =
            (self.command_max_age_ms > 0).then_some(self.command_max_age_ms);
        max_age_ms[Class::Control.index()] =
            (self.control_max_age_ms > 0).then_some(self.control_max_age_ms);
        crate::log::Retention {
            hot_bytes: self.hot_bytes,
            max_age_ms,
            max_bytes: (self.max_bytes > 0).then_some(self.max_bytes),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            backend: LogBackendKind::Embedded,
            sync: SyncPolicy::Always,
            writer: WriterKind::Auto,
            segment_bytes: 64 << 20,
            writer_queue: 65_536,
            redelivery_timeout_ms: 10_000,
            delta_max_ops: 4096,
            delta_requests_per_s: 50,
            compaction_interval_ms: 60_000,
            hot_bytes: 256 << 20,
            command_max_age_ms: 7 * 24 * 3600 * 1000,
            control_max_age_ms: 30 * 24 * 3600 * 1000,
            max_bytes: 0,
            format: LogFormat::Text,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain; when unset a development CA under DATA_DIR/tls is used.
    pub cert: Option<PathBuf>,
    /// PEM private key for `cert`.
    pub key: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest frame accepted or sent (bytes after the 4-byte length prefix).
    pub max_frame_bytes: u32,
    /// Concurrent connections; further ones are refused with Busy.
    pub max_connections: u32,
    /// Subscriptions one session may hold.
    pub max_subscriptions: u32,
    /// Swarms one session may join in Hello.
    pub max_swarms_per_session: u32,
    /// Swarms the router keeps in memory, all shards together; a subscribe or publish that
    /// would create one more is refused with `Busy`.
    pub max_swarms: u32,
    /// Swarms in memory one agent may have created (refused with `Busy` past it). A swarm
    /// with no log and no members is collected and stops counting; one with a log counts
    /// until the router restarts.
    pub max_swarms_per_agent: u32,
    /// Distinct leases the router keeps (each keeps its newest token for good, so its
    /// fencing never goes backwards); acquiring a new one past this is refused with `Busy`.
    pub max_leases: u32,
    /// Leases one agent may hold at once; acquiring one more is refused with `Busy`. An
    /// expired holding counts until the sweep a second later.
    pub max_leases_per_agent: u32,
    /// Bytes that the unfinished frames of one connection's streams may hold, counted as
    /// they arrive; a chunk that would take it past this closes the connection with `Busy`.
    /// At least twice `max_frame_bytes` + 4.
    pub partial_frame_bytes: usize,
    /// The same for all connections together; past it the connection whose chunk did not
    /// fit is closed with `Busy`.
    pub router_partial_frame_bytes: usize,
    /// Milliseconds a new connection has to send Hello.
    pub hello_timeout_ms: u64,
    /// Milliseconds without traffic before a connection is closed (clients keep alive).
    pub idle_timeout_ms: u64,
    /// Commands queued to a shard before readers wait (backpressure to publishers).
    pub shard_queue: usize,
    /// Bytes a client may send on one connection before the router has read them (QUIC
    /// connection flow-control window): the most a connection can make the router buffer
    /// on the way in.
    pub receive_window_bytes: u32,
    /// The same per stream (each publish stream, the session stream).
    pub stream_receive_window_bytes: u32,
    /// The same two windows for connections on the bulk listener (bulk connections carry
    /// telemetry and jobs). Smaller by default: a telemetry sender needs little more than
    /// its bandwidth-delay product, and whatever a flood of them sends before the router
    /// reads it is buffered, decrypted and acknowledged first, CPU taken from commands.
    pub bulk_receive_window_bytes: u32,
    pub bulk_stream_receive_window_bytes: u32,
    /// Largest payload a publish of each class may carry (never more than the frame limit
    /// allows). Heavy work belongs in the job queue, off the real-time path.
    pub max_payload_bytes: ClassPayloadLimits,
}

/// `limits.max_payload_bytes`: the largest publish payload per class.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClassPayloadLimits {
    pub control: u32,
    pub command: u32,
    pub alert: u32,
    pub reconciliation: u32,
    pub telemetry: u32,
}

impl Default for ClassPayloadLimits {
    fn default() -> Self {
        ClassPayloadLimits {
            control: 64 << 10,
            command: 256 << 10,
            alert: 64 << 10,
            reconciliation: 256 << 10,
            telemetry: 64 << 10,
        }
    }
}

impl ClassPayloadLimits {
    pub fn for_class(&self, class: Class) -> u32 {
        match class {
            Class::Control => self.control,
            Class::Command => self.command,
            Class::Alert => self.alert,
            Class::Reconciliation => self.reconciliation,
            Class::Telemetry => self.telemetry,
        }
    }
}

/// Outbound queue capacity per connection and class, in frames.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Replies on the session stream (Welcome, acks, errors).
    pub session: usize,
    pub control: usize,
    pub command: usize,
    pub alert: usize,
    pub reconciliation: usize,
    /// When full, the oldest telemetry frame is dropped and counted.
    pub telemetry: usize,
    /// Job traffic to one connection (leases, cancels, job updates); when full the
    /// connection is closed as lagging (job ends are sent again when it reconnects).
    pub jobs: usize,
    /// Bytes queued for one connection, all lanes together. Telemetry may fill at most half
    /// of it (it is shed past that); control and command subscribers at the cap catch up
    /// from the log; session replies, alerts and reconciliation at the cap mark the
    /// connection lagging.
    pub connection_bytes: usize,
    /// Bytes queued for all connections together, with the same rules as
    /// `connection_bytes`.
    pub router_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("constant address parses"),
            bulk_listen: BulkListen::Auto,
            admin_listen: AdminListen::At(
                DEFAULT_ADMIN_LISTEN
                    .parse()
                    .expect("constant address parses"),
            ),
            admin_metrics_open: true,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            router_name: "swarmbus".into(),
            shards: 0,
            tls: TlsConfig::default(),
            auth: crate::auth::AuthConfig::default(),
            limits: LimitsConfig::default(),
            queues: QueueConfig::default(),
            log: LogConfig::default(),
            jetstream: swarmbus_jetstream::JetStreamConfig::default(),
            rate_limits: RateLimitsConfig::default(),
            affinity: swarmbus_proto::workers::AffinityConfig::default(),
            presence: swarmbus_proto::control::PresenceConfig::default(),
            jobs: swarmbus_proto::jobs::JobsConfig::default(),
            runtime: RuntimeConfig::default(),
            governor: swarmbus_proto::governor::GovernorConfig::default(),
            clock: ClockConfig::default(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_frame_bytes: swarmbus_schema::DEFAULT_MAX_FRAME_BYTES as u32,
            max_connections: 10_000,
            max_subscriptions: 1_024,
            max_swarms_per_session: 64,
            max_swarms: 100_000,
            max_swarms_per_agent: 1_024,
            max_leases: 100_000,
            max_leases_per_agent: 1_024,
            partial_frame_bytes: 16 << 20,
            router_partial_frame_bytes: 1 << 30,
            hello_timeout_ms: 10_000,
            idle_timeout_ms: 30_000,
            shard_queue: 8_192,
            receive_window_bytes: 2 << 20,
            stream_receive_window_bytes: 1 << 20,
            bulk_receive_window_bytes: 256 << 10,
            bulk_stream_receive_window_bytes: 128 << 10,
            max_payload_bytes: ClassPayloadLimits::default(),
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            session: 65_536,
            control: 4_096,
            command: 65_536,
            alert: 4_096,
            reconciliation: 4_096,
            telemetry: 8_192,
            jobs: 65_536,
            connection_bytes: 64 << 20,
            router_bytes: 2 << 30,
        }
    }
}

impl QueueConfig {
    pub fn for_class(&self, class: Class) -> usize {
        match class {
            Class::Control => self.control,
            Class::Command => self.command,
            Class::Alert => self.alert,
            Class::Reconciliation => self.reconciliation,
            Class::Telemetry => self.telemetry,
        }
    }
}

/// Reads the TOML file at `path` with `parse`: a file that cannot be read is `ConfigRead`,
/// one that `parse` refuses is `ConfigFile`, each naming the path. The router's
/// configuration, policy and revocations files are all read so.
pub(crate) fn read_config_file<T>(
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, RouterError> {
    let text = std::fs::read_to_string(path).map_err(|source| RouterError::ConfigRead {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|detail| RouterError::ConfigFile {
        path: path.to_owned(),
        detail,
    })
}

fn config_error(detail: impl Into<String>) -> RouterError {
    RouterError::Config {
        detail: detail.into(),
    }
}

impl Config {
    /// Parses a TOML document (unknown keys are an error, so typos do not pass silently).
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    pub fn from_file(path: &Path) -> Result<Config, RouterError> {
        read_config_file(path, Config::from_toml)
    }

    /// The configuration from the embedded defaults, then `file` (TOML), then `vars` (pass
    /// `std::env::vars()`): `SWARMBUS_<SECTION>__<KEY>` sets any key of any section
    /// (`SWARMBUS_LOG__SEGMENT_BYTES=1048576`, `SWARMBUS_RATE_LIMITS__COMMAND__RATE_PER_S=5000`;
    /// deeper tables take more `__`), its value read as a TOML value when it is one (a
    /// number, `true`, `[...]`) and as a string otherwise; then the short names of
    /// [`Config::apply_env`] (`SWARMBUS_LISTEN`, ...), which also set the top-level keys.
    /// Not validated: see [`Config::validate`].
    pub fn load(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, RouterError> {
        let base = match file {
            // The file alone first, so that its own mistakes name it.
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        // Every key present (the defaults filled in), so that a variable sets one key of a
        // table and the table's other keys keep their values.
        let mut table = toml::Table::try_from(&base)
            .map_err(|e| config_error(format!("the configuration as a table: {e}")))?;
        let mut short = Vec::new();
        let mut nested = Vec::new();
        for (key, value) in vars {
            match key.strip_prefix("SWARMBUS_") {
                Some(name) if name.contains("__") => {
                    let path: Vec<String> = name.split("__").map(str::to_ascii_lowercase).collect();
                    set_path(&mut table, &path, env_value(&value))
                        .map_err(|detail| config_error(format!("{key}: {detail}")))?;
                    nested.push(key);
                }
                _ => short.push((key, value)),
            }
        }
        let mut config: Config = toml::Value::Table(table).try_into().map_err(|e| {
            config_error(format!(
                "the environment ({}): {e}",
                if nested.is_empty() {
                    "no SWARMBUS_*__* variable".to_owned()
                } else {
                    nested.join(", ")
                }
            ))
        })?;
        config.apply_env(short)?;
        Ok(config)
    }

    /// Applies `SWARMBUS_*` overrides from `vars` (pass `std::env::vars()`).
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), RouterError> {
        fn parse<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, RouterError>
        where
            T::Err: std::fmt::Display,
        {
            value
                .parse()
                .map_err(|e| config_error(format!("{key}={value:?}: {e}")))
        }
        for (key, value) in vars {
            match key.as_str() {
                "SWARMBUS_LISTEN" => self.listen = parse(&key, &value)?,
                "SWARMBUS_BULK_LISTEN" => self.bulk_listen = parse(&key, &value)?,
                "SWARMBUS_ADMIN_LISTEN" => self.admin_listen = parse(&key, &value)?,
                "SWARMBUS_ADMIN_METRICS_OPEN" => self.admin_metrics_open = parse(&key, &value)?,
                "SWARMBUS_DATA_DIR" => self.data_dir = PathBuf::from(value),
                "SWARMBUS_ROUTER_NAME" => self.router_name = value,
                "SWARMBUS_SHARDS" => self.shards = parse(&key, &value)?,
                "SWARMBUS_TLS_CERT" => self.tls.cert = Some(PathBuf::from(value)),
                "SWARMBUS_TLS_KEY" => self.tls.key = Some(PathBuf::from(value)),
                "SWARMBUS_AUTH_MODE" => {
                    self.auth.mode = match value.as_str() {
                        "none" => crate::auth::AuthMode::None,
                        "required" => crate::auth::AuthMode::Required,
                        _ => {
                            return Err(config_error(format!(
                                "{key}={value:?}: expected none or required"
                            )))
                        }
                    }
                }
                "SWARMBUS_MAX_FRAME_BYTES" => self.limits.max_frame_bytes = parse(&key, &value)?,
                "SWARMBUS_MAX_CONNECTIONS" => self.limits.max_connections = parse(&key, &value)?,
                "SWARMBUS_LOG_SYNC" => self.log.sync = parse(&key, &value)?,
                "SWARMBUS_LOG_WRITER" => self.log.writer = parse(&key, &value)?,
                "SWARMBUS_BULK_THREADS" => self.runtime.bulk_threads = parse(&key, &value)?,
                "SWARMBUS_BULK_PRIORITY" => self.runtime.bulk_priority = parse(&key, &value)?,
                "SWARMBUS_LOG" => {} // read by the binary's log filter
                other if other.starts_with("SWARMBUS_") => {
                    return Err(config_error(format!(
                        "unknown environment variable {other} (see docs/configuration.md)"
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The bulk listener's address to bind (port 0: the OS picks), if there is one.
    pub fn bulk_listen_addr(&self) -> Option<SocketAddr> {
        match self.bulk_listen {
            BulkListen::Auto => Some(SocketAddr::new(self.listen.ip(), 0)),
            BulkListen::Off => None,
            BulkListen::At(addr) => Some(addr),
        }
    }

    /// Checks values that would otherwise fail later or behave surprisingly.
    // One check per setting, in the order of `router/swarmbus.example.toml`, each with the
    // message an operator sees: a list, long by design.
    pub fn validate(&self) -> Result<(), RouterError> {
        if self.log.backend == LogBackendKind::Jetstream {
            let js = &self.jetstream;
            if js.urls.is_empty() {
                return Err(config_error(
                    "log.backend = \"jetstream\" needs jetstream.urls",
                ));
            }
            if js.replicas == 0 || js.max_in_flight == 0 || js.ack_timeout_ms == 0 {
                return Err(config_error(
                    "jetstream.replicas, jetstream.max_in_flight and jetstream.ack_timeout_ms must be at least 1",
                ));
            }
            if js.replicas > 5 || js.connect_timeout_ms == 0 {
                return Err(config_error(
                    "jetstream.replicas must be 1 to 5 (JetStream's limit) and jetstream.connect_timeout_ms at least 1",
                ));
            }
            let token_ok = |t: &str| {
                !t.is_empty()
                    && t.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            };
            if !token_ok(&js.stream_prefix) || js.stream_prefix.len() > 54 {
                return Err(config_error(format!(
                    "jetstream.stream_prefix {:?}: letters, digits, '_' and '-' only, at most 54",
                    js.stream_prefix
                )));
            }
            // `<subject_prefix>.tel.<swarm>` carries telemetry: a prefix ending in `tel`
            // would make one deployment's log subjects another's telemetry subjects.
            if !js.subject_prefix.split('.').all(token_ok) || js.subject_prefix.ends_with(".tel") {
                return Err(config_error(format!(
                    "jetstream.subject_prefix {:?}: dot-separated tokens of letters, digits, '_' and '-', not ending in .tel",
                    js.subject_prefix
                )));
            }
            if js.monitor_urls.is_empty() && !js.danger_unsynced_acks {
                return Err(config_error(
                    "jetstream.monitor_urls is empty: list every server's HTTP monitoring endpoint \
                     (http://host:8222) so the router can check that it syncs before acknowledging, \
                     or set jetstream.danger_unsynced_acks = true",
                ));
            }
            if js.append_deadline_ms < js.ack_timeout_ms {
                return Err(config_error(
                    "jetstream.append_deadline_ms must be at least jetstream.ack_timeout_ms",
                ));
            }
        }
        // Without credentials nobody is identified: loopback only.
        let open = self.auth.mode == crate::auth::AuthMode::None;
        if open && !self.listen.ip().is_loopback() {
            return Err(RouterError::NonLoopbackListen { addr: self.listen });
        }
        if let BulkListen::At(bulk) = self.bulk_listen {
            if open && !bulk.ip().is_loopback() {
                return Err(RouterError::NonLoopbackListen { addr: bulk });
            }
            if bulk == self.listen && bulk.port() != 0 {
                return Err(config_error("bulk_listen must differ from listen"));
            }
        }
        if let AdminListen::At(admin) = self.admin_listen {
            // Plain HTTP: a credential sent to it crosses no network, and metrics and health
            // (open by default) answer whoever reaches it.
            if !admin.ip().is_loopback() {
                return Err(config_error(format!(
                    "admin_listen {admin}: the admin listener serves loopback addresses only \
                     (its metrics answer anyone who reaches it); scrape it through a local agent or proxy"
                )));
            }
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(config_error("tls.cert and tls.key must be set together"));
        }
        if self.runtime.bulk_threads > 1024 {
            return Err(config_error("runtime.bulk_threads must be at most 1024"));
        }
        let limits = &self.limits;
        if limits.max_frame_bytes < 1024 || limits.max_frame_bytes > 64 << 20 {
            return Err(config_error(
                "limits.max_frame_bytes must be between 1024 and 67108864",
            ));
        }
        self.auth.check().map_err(config_error)?;
        let max_swarms = limits.max_swarms_per_session;
        if max_swarms == 0 || max_swarms > swarmbus_schema::MAX_SWARMS_PER_SESSION {
            return Err(config_error(format!(
                "limits.max_swarms_per_session must be between 1 and {}",
                swarmbus_schema::MAX_SWARMS_PER_SESSION
            )));
        }
        let hello_bytes = swarmbus_schema::max_hello_frame_bytes(max_swarms);
        if (limits.max_frame_bytes as usize) < hello_bytes {
            return Err(config_error(format!(
                "limits.max_frame_bytes must be at least {hello_bytes} for \
                 limits.max_swarms_per_session = {max_swarms}: a Hello joining that many swarms \
                 with its resume points must fit one frame"
            )));
        }
        let q = &self.queues;
        for (name, value) in [
            ("session", q.session),
            ("control", q.control),
            ("command", q.command),
            ("alert", q.alert),
            ("reconciliation", q.reconciliation),
            ("telemetry", q.telemetry),
            ("jobs", q.jobs),
        ] {
            if value == 0 {
                return Err(config_error(format!("queues.{name} must be at least 1")));
            }
        }
        // A frame of the largest size must fit the telemetry half of each byte budget, or
        // such a message could never be queued.
        let frame_room = 2 * (limits.max_frame_bytes as usize + 4);
        if q.connection_bytes < frame_room || q.router_bytes < q.connection_bytes {
            return Err(config_error(format!(
                "queues.connection_bytes must be at least twice limits.max_frame_bytes + 4 \
                 ({frame_room}) and queues.router_bytes at least queues.connection_bytes"
            )));
        }
        self.jobs.validate().map_err(config_error)?;
        if self.log.segment_bytes < 4096
            || self.log.writer_queue == 0
            || self.log.delta_max_ops == 0
            || self.log.redelivery_timeout_ms == 0
            || self.log.compaction_interval_ms == 0
        {
            return Err(config_error(
                "log.segment_bytes must be at least 4096; log.writer_queue, log.delta_max_ops, \
                 log.redelivery_timeout_ms and log.compaction_interval_ms at least 1",
            ));
        }
        let role_names = std::iter::once(("rate_limits.roles".to_owned(), &self.rate_limits.roles))
            .chain(self.rate_limits.swarms.iter().map(|(swarm, rates)| {
                (format!("rate_limits.swarms.{swarm:?}.roles"), &rates.roles)
            }));
        for (path, roles) in role_names {
            if let Some(name) = roles
                .keys()
                .find(|name| !["agent", "controller", "worker"].contains(&name.as_str()))
            {
                return Err(config_error(format!(
                    "{path}.{name}: roles are agent, controller and worker"
                )));
            }
        }
        if let Some(swarm) = self.rate_limits.swarms.keys().find(|s| !valid_name(s)) {
            return Err(config_error(format!(
                "rate_limits.swarms.{swarm:?}: a swarm name is 1 to {MAX_NAME_BYTES} bytes"
            )));
        }
        let roles = [Role::Agent, Role::Controller, Role::Worker];
        let swarm_rates = self.rate_limits.swarms.keys().flat_map(|swarm| {
            roles
                .into_iter()
                .filter_map(move |role| self.rate_limits.swarm_rates_for(swarm, role))
        });
        let rates = roles
            .into_iter()
            .map(|role| self.rate_limits.rates_for(role))
            .chain(swarm_rates)
            .flatten();
        for rate in rates {
            if !(rate.rate_per_s >= 0.0 && rate.burst >= 1.0) {
                return Err(config_error(
                    "rate_limits: rate_per_s must be >= 0 and burst >= 1",
                ));
            }
        }
        if !(self.rate_limits.router_telemetry_per_s >= 0.0
            && self.rate_limits.router_telemetry_per_s.is_finite())
        {
            return Err(config_error(
                "rate_limits.router_telemetry_per_s must be a finite number >= 0",
            ));
        }
        self.governor.check().map_err(config_error)?;
        for (name, breaker) in [
            ("breaker", &self.rate_limits.breaker),
            ("swarm_breaker", &self.rate_limits.swarm_breaker),
        ] {
            if breaker.failures == 0 || breaker.probes == 0 || breaker.window_ms == 0 {
                return Err(config_error(format!(
                    "rate_limits.{name}: failures, probes and window_ms must be at least 1"
                )));
            }
        }
        // Frames larger than a window still pass: the reader frees the window as it reads.
        for (prefix, connection, stream) in [
            (
                "",
                limits.receive_window_bytes,
                limits.stream_receive_window_bytes,
            ),
            (
                "bulk_",
                limits.bulk_receive_window_bytes,
                limits.bulk_stream_receive_window_bytes,
            ),
        ] {
            if stream < 65_536 || connection < stream {
                return Err(config_error(format!(
                    "limits.{prefix}stream_receive_window_bytes must be at least 65536 and \
                     limits.{prefix}receive_window_bytes at least \
                     limits.{prefix}stream_receive_window_bytes"
                )));
            }
        }
        if self.presence.heartbeat_interval_ms == 0
            || self.presence.max_lease_ttl_ms == 0
            || self.presence.queries_per_s == 0
        {
            return Err(config_error(
                "presence.heartbeat_interval_ms, presence.max_lease_ttl_ms and \
                 presence.queries_per_s must be at least 1",
            ));
        }
        if limits.partial_frame_bytes < frame_room
            || limits.router_partial_frame_bytes < limits.partial_frame_bytes
        {
            return Err(config_error(format!(
                "limits.partial_frame_bytes must be at least twice limits.max_frame_bytes + 4 \
                 ({frame_room}), and limits.router_partial_frame_bytes at least \
                 limits.partial_frame_bytes"
            )));
        }
        if limits.max_connections == 0
            || limits.shard_queue == 0
            || limits.max_swarms == 0
            || limits.max_swarms_per_agent == 0
            || limits.max_leases == 0
            || limits.max_leases_per_agent == 0
        {
            return Err(config_error(
                "limits.max_connections, limits.shard_queue, limits.max_swarms, \
                 limits.max_swarms_per_agent, limits.max_leases and limits.max_leases_per_agent \
                 must be at least 1",
            ));
        }
        Ok(())
    }

    /// Shards to run: the configured number, or one per available core.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every leaf of `table` under `prefix`: its path and value (empty tables skipped).
    fn leaves(table: &toml::Table, prefix: &[String], out: &mut Vec<(Vec<String>, toml::Value)>) {
        for (key, value) in table {
            let mut path = prefix.to_vec();
            path.push(key.clone());
            match value {
                toml::Value::Table(inner) => leaves(inner, &path, out),
                leaf => out.push((path, leaf.clone())),
            }
        }
    }

    /// The text an operator would put in a variable for `value`.
    fn env_text(value: &toml::Value) -> String {
        match value {
            toml::Value::String(text) => text.clone(),
            other => other.to_string(),
        }
    }

    #[test]
    fn every_key_can_be_set_from_the_environment() {
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        let mut all = Vec::new();
        leaves(&defaults, &[], &mut all);
        assert!(all.len() > 60, "only {} keys walked", all.len());
        // Each key, moved off its default (numbers up, booleans flipped, texts to another
        // value their key takes), set from its own variable alone, lands where the file
        // would put it, and nothing else moves.
        let strings = [
            "off",
            "shared",
            "never_danger",
            "json",
            "required",
            "file",
            "jetstream",
            "/tmp/x",
        ];
        let mut moved_keys = 0;
        for (path, value) in &all {
            let candidates: Vec<toml::Value> = match value {
                toml::Value::Integer(n) => vec![toml::Value::Integer(n + 1)],
                toml::Value::Float(x) => vec![toml::Value::Float(x + 0.5)],
                toml::Value::Boolean(b) => vec![toml::Value::Boolean(!b)],
                toml::Value::String(_) => strings
                    .iter()
                    .map(|s| toml::Value::String(s.to_string()))
                    .collect(),
                // A list of texts (servers, files) gets one more.
                toml::Value::Array(items) => {
                    let mut longer = items.clone();
                    longer.push(toml::Value::String("/tmp/x".into()));
                    vec![toml::Value::Array(longer)]
                }
                other => vec![other.clone()],
            };
            let expected = candidates.into_iter().find_map(|moved| {
                let mut changed = defaults.clone();
                set_path(&mut changed, path, moved.clone()).unwrap();
                let config: Config = toml::Value::Table(changed).try_into().ok()?;
                (config != Config::default()).then_some((moved, config))
            });
            let (moved, expected) = match expected {
                Some(found) => found,
                // A text no candidate fits (a prefix, a name): set to its default.
                None => (value.clone(), Config::default()),
            };
            moved_keys += usize::from(expected != Config::default());
            let name = match path.as_slice() {
                // Top-level keys have short names.
                [key] => format!("SWARMBUS_{}", key.to_ascii_uppercase()),
                _ => format!("SWARMBUS_{}", path.join("__").to_ascii_uppercase()),
            };
            let from_env = Config::load(None, [(name.clone(), env_text(&moved))])
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(from_env, expected, "{name}");
        }
        assert!(
            moved_keys + 5 > all.len(),
            "{moved_keys} of {} keys moved",
            all.len()
        );
        // The documented example: one key of a table, the table's others kept.
        let vars = [(
            "SWARMBUS_RATE_LIMITS__COMMAND__RATE_PER_S".to_string(),
            "5000".to_string(),
        )];
        let rates = Config::load(None, vars).unwrap().rate_limits;
        assert_eq!(rates.command.rate_per_s, 5000.0);
        assert_eq!(
            rates.command.burst,
            Config::default().rate_limits.command.burst
        );
        // The file is read first, the environment wins, and a typo names its variable.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("router.toml");
        std::fs::write(&file, "shards = 3\n[log]\nsegment_bytes = 4096\n").unwrap();
        let vars = [(
            "SWARMBUS_LOG__SEGMENT_BYTES".to_string(),
            "8192".to_string(),
        )];
        let both = Config::load(Some(&file), vars).unwrap();
        assert_eq!((both.shards, both.log.segment_bytes), (3, 8192));
        let typo = [("SWARMBUS_LOG__SEGMENT_BYTS".to_string(), "1".to_string())];
        let error = Config::load(None, typo).unwrap_err().to_string();
        assert!(error.contains("SWARMBUS_LOG__SEGMENT_BYTS"), "{error}");
        assert!(error.contains("segment_byts"), "{error}");
    }

    #[test]
    fn the_production_sample_is_a_valid_configuration() {
        let text = include_str!("../../deploy/router.production.toml");
        let config = Config::from_toml(text).unwrap();
        config.validate().unwrap();
        assert_eq!(config.auth.mode, crate::auth::AuthMode::Required);
        assert!(config.tls.cert.is_some() && config.auth.client_ca.is_some());
        assert_eq!(
            config.admin_listen,
            AdminListen::At("127.0.0.1:9464".parse().unwrap())
        );
    }

    #[test]
    fn jetstream_secrets_in_the_file_survive_loading_with_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("router.toml");
        std::fs::write(
            &path,
            "[log]\nbackend = \"jetstream\"\n[jetstream]\nuser = \"router\"\npassword = \"s3cret\"\ntoken = \"t0ken\"\nmonitor_urls = [\"http://127.0.0.1:8222\"]\n",
        )
        .unwrap();
        let vars = [("SWARMBUS_JETSTREAM__REPLICAS".to_string(), "3".to_string())];
        let config = Config::load(Some(&path), vars).unwrap();
        config.validate().unwrap();
        assert_eq!(config.jetstream.password.as_deref(), Some("s3cret"));
        assert_eq!(config.jetstream.token.as_deref(), Some("t0ken"));
        assert_eq!(config.jetstream.replicas, 3);
        let bad = Config::from_toml("[log]\nbackend = \"jetstream\"\n[jetstream]\nstream_prefix = \"a.b\"\nmonitor_urls = [\"http://x:1\"]\n").unwrap();
        assert!(bad.validate().is_err());
        let unverified = Config::from_toml("[log]\nbackend = \"jetstream\"\n").unwrap();
        let error = unverified.validate().unwrap_err().to_string();
        assert!(error.contains("monitor_urls"), "{error}");
    }

    #[test]
    fn example_config_parses_to_the_defaults() {
        let text = include_str!("../swarmbus.example.toml");
        assert_eq!(Config::from_toml(text).unwrap(), Config::default());
    }

    #[test]
    fn role_rate_overrides_apply_to_their_role_only() {
        let c = Config::from_toml(
            "[rate_limits.roles.agent]\ncommand = { rate_per_s = 10.0, burst = 20.0 }\n",
        )
        .unwrap();
        c.validate().unwrap();
        let agent = c.rate_limits.rates_for(Role::Agent);
        let controller = c.rate_limits.rates_for(Role::Controller);
        assert_eq!(agent[Class::Command.index()], Rate::new(10.0, 20.0));
        assert_eq!(
            controller[Class::Command.index()],
            RateLimitsConfig::default().command
        );
        assert_eq!(
            agent[Class::Telemetry.index()],
            RateLimitsConfig::default().telemetry
        );
        let bad = Config::from_toml("[rate_limits.roles.admin]\n").unwrap();
        assert!(bad.validate().is_err());

        let c = Config::from_toml(
            "[rate_limits.roles.agent]\ncommand = { rate_per_s = 10.0, burst = 20.0 }\n\
             [rate_limits.swarms.big]\ntelemetry = { rate_per_s = 5.0, burst = 5.0 }\n\
             [rate_limits.swarms.big.roles.agent]\ncommand = { rate_per_s = 50.0, burst = 50.0 }\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.rate_limits.swarm_rates_for("small", Role::Agent), None);
        let big_agent = c.rate_limits.swarm_rates_for("big", Role::Agent).unwrap();
        assert_eq!(big_agent[Class::Command.index()], Rate::new(50.0, 50.0));
        assert_eq!(big_agent[Class::Telemetry.index()], Rate::new(5.0, 5.0));
        let big_worker = c.rate_limits.swarm_rates_for("big", Role::Worker).unwrap();
        assert_eq!(
            big_worker[Class::Command.index()],
            RateLimitsConfig::default().command
        );
        for bad in [
            "[rate_limits.swarms.big.roles.admin]\n",
            "[rate_limits.swarms.big]\ncommand = { rate_per_s = -1.0, burst = 5.0 }\n",
            "[queues]\nconnection_bytes = 1000\n",
        ] {
            let config = Config::from_toml(bad).unwrap();
            assert!(config.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(Config::from_toml("listne = \"127.0.0.1:1\"").is_err());
    }

    #[test]
    fn env_overrides_apply_and_typos_fail() {
        let mut c = Config::default();
        c.apply_env([("SWARMBUS_LISTEN".to_string(), "127.0.0.1:9".to_string())])
            .unwrap();
        assert_eq!(c.listen.port(), 9);
        assert!(c
            .apply_env([("SWARMBUS_LISTN".to_string(), "x".to_string())])
            .is_err());
    }

    #[test]
    fn non_loopback_listen_is_refused() {
        let c = Config {
            listen: "0.0.0.0:4433".parse().unwrap(),
            ..Config::default()
        };
        let err = c.validate().unwrap_err();
        assert!(matches!(err, RouterError::NonLoopbackListen { .. }));
        assert!(err.to_string().contains("loopback"));
        Config::default().validate().unwrap();
    }

    #[test]
    fn receive_windows_are_checked_for_each_listener() {
        let c = Config::default();
        assert_eq!(c.limits.bulk_receive_window_bytes, 256 << 10);
        assert_eq!(c.limits.bulk_stream_receive_window_bytes, 128 << 10);
        let ok = "[limits]\nbulk_receive_window_bytes = 65536\nbulk_stream_receive_window_bytes = 65536\n";
        Config::from_toml(ok).unwrap().validate().unwrap();
        for (bad, names) in [
            (
                "[limits]\nstream_receive_window_bytes = 1000\n",
                "limits.stream_",
            ),
            (
                "[limits]\nbulk_stream_receive_window_bytes = 1000\n",
                "limits.bulk_stream_",
            ),
            (
                "[limits]\nbulk_receive_window_bytes = 100000\n",
                "limits.bulk_stream_",
            ),
        ] {
            let err = Config::from_toml(bad).unwrap().validate().unwrap_err();
            assert!(err.to_string().contains(names), "{bad}: {err}");
        }
    }

    #[test]
    fn bulk_priority_parses_from_toml_and_env() {
        let c = Config::from_toml("[runtime]\nbulk_priority = \"nice:12\"\nbulk_threads = 3\n")
            .unwrap();
        assert_eq!(c.runtime.bulk_priority, BulkPriority::Nice(12));
        assert_eq!(c.runtime.bulk_thread_count(), 3);
        assert_eq!(
            Config::default().runtime.bulk_priority,
            BulkPriority::Nice(10)
        );
        for bad in ["nice:20", "nice:-1", "low", "nice:", "idle"] {
            let text = format!("[runtime]\nbulk_priority = \"{bad}\"\n");
            assert!(Config::from_toml(&text).is_err(), "{bad}");
        }
        let mut c = Config::default();
        c.apply_env([("SWARMBUS_BULK_PRIORITY".to_string(), "shared".to_string())])
            .unwrap();
        assert_eq!(c.runtime.bulk_priority, BulkPriority::Shared);
        assert_eq!(c.runtime.bulk_priority.to_string(), "shared");
    }

    #[test]
    fn bulk_listen_is_auto_off_or_a_loopback_address_apart_from_listen() {
        let auto = Config::default();
        assert_eq!(auto.bulk_listen, BulkListen::Auto);
        assert_eq!(
            auto.bulk_listen_addr(),
            Some("127.0.0.1:0".parse().unwrap())
        );
        let off = Config::from_toml("bulk_listen = \"off\"\n").unwrap();
        assert_eq!(off.bulk_listen_addr(), None);
        let mut env = Config::default();
        env.apply_env([("SWARMBUS_BULK_LISTEN".to_string(), "off".to_string())])
            .unwrap();
        assert_eq!(env.bulk_listen, BulkListen::Off);
        assert!(Config::from_toml("bulk_listen = \"sometimes\"\n").is_err());
        let c = Config::from_toml("bulk_listen = \"127.0.0.1:4434\"\n").unwrap();
        assert_eq!(
            c.bulk_listen,
            BulkListen::At("127.0.0.1:4434".parse().unwrap())
        );
        c.validate().unwrap();
        let same = Config::from_toml("bulk_listen = \"127.0.0.1:4433\"\n").unwrap();
        assert!(same.validate().is_err());
        let open = Config::from_toml("bulk_listen = \"0.0.0.0:4434\"\n").unwrap();
        assert!(matches!(
            open.validate(),
            Err(RouterError::NonLoopbackListen { .. })
        ));
    }
}
