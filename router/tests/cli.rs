//! The `swarmbus-router` binary as an operator runs it. These tests live in the router
//! crate (not the top-level `tests/`) because Cargo exposes a binary's path only to the
//! integration tests of its own package.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ROUTER: &str = env!("CARGO_BIN_EXE_swarmbus-router");

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the router in `dir` with `args` and returns it with its `listening on` line.
fn start(dir: &std::path::Path, args: &[&str]) -> (Running, String) {
    start_with(dir, args, &[])
}

/// [`start`] with environment variables.
fn start_with(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (Running, String) {
    let mut child = Command::new(ROUTER)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .env("SWARMBUS_LOG", "warn")
        // Tests run at once: each admin listener on a port of its own.
        .env("SWARMBUS_ADMIN_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("router starts");
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("a `listening on` line within 30 s");
        if line.contains("listening on") {
            return (running, line);
        }
    }
}

#[test]
fn runs_on_embedded_defaults_and_reuses_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    // No arguments at all: the embedded defaults (127.0.0.1:4433, ./swarmbus-data). The port
    // may be taken on a shared machine, so only a bind error is tolerated there.
    let output = Command::new(ROUTER)
        .current_dir(dir.path())
        .env("SWARMBUS_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut running = Running(output);
    let stdout = running.0.stdout.take().unwrap();
    let mut first = String::new();
    BufReader::new(stdout).read_line(&mut first).unwrap();
    if first.is_empty() {
        let status = running.0.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut running.0.stderr.take().unwrap(), &mut stderr).unwrap();
        let busy = ["binding 127.0.0.1:4433", "binding 127.0.0.1:9464"];
        assert!(
            !status.success() && busy.iter().any(|b| stderr.contains(b)),
            "{stderr}"
        );
    } else {
        assert!(first.contains("listening on 127.0.0.1:4433"), "{first}");
        assert!(first.contains("admin on http://127.0.0.1:9464"), "{first}");
        assert!(dir.path().join("swarmbus-data/tls/ca.pem").exists());
    }
    drop(running);

    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap();
    let (router, line) = start(
        dir.path(),
        &["--listen", "127.0.0.1:0", "--data-dir", data_arg],
    );
    assert!(line.contains("listening on 127.0.0.1:"), "{line}");
    let ca = std::fs::read(data.join("tls/ca.pem")).unwrap();
    drop(router);
    let (_router, _) = start(
        dir.path(),
        &["--listen", "127.0.0.1:0", "--data-dir", data_arg],
    );
    assert_eq!(
        std::fs::read(data.join("tls/ca.pem")).unwrap(),
        ca,
        "CA replaced on restart"
    );
}

#[test]
fn refuses_a_non_loopback_address_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(ROUTER)
        .args(["--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0"),
        "{stderr}"
    );
    assert!(stderr.contains("loopback"), "{stderr}");
    assert!(!stderr.contains("backtrace"), "{stderr}");
}

#[test]
fn a_bad_config_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("router.toml");
    std::fs::write(&config, "listne = \"127.0.0.1:1\"\n").unwrap();
    let output = Command::new(ROUTER)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("router.toml") && stderr.contains("listne"),
        "{stderr}"
    );
}

/// The address on a start line.
fn listening_on(line: &str) -> std::net::SocketAddr {
    line.split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|addr| addr.parse().ok())
        .expect("an address on the start line")
}

/// `creds issue` for `agent` as an agent in `swarm`, signed with the data dir's key.
fn issue(data_dir: &str, agent: &str, swarm: &str) -> String {
    let issued = Command::new(ROUTER)
        .args(["creds", "issue", "--data-dir", data_dir, "--agent", agent])
        .args(["--role", "agent", "--swarm", swarm, "--ttl", "10m"])
        .env("SWARMBUS_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        issued.status.success(),
        "{}",
        String::from_utf8_lossy(&issued.stderr)
    );
    let token = String::from_utf8(issued.stdout).unwrap().trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "{token}");
    token
}

#[tokio::test]
async fn with_required_auth_it_listens_on_any_address_and_serves_issued_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap();
    let (_router, line) = start_with(
        dir.path(),
        &["--listen", "0.0.0.0:0", "--data-dir", data_arg],
        &[("SWARMBUS_AUTH_MODE", "required")],
    );
    assert!(line.contains("listening on 0.0.0.0:"), "{line}");
    assert!(line.contains("auth: required"), "{line}");
    let port = listening_on(&line).port();
    let token = issue(data_arg, "a1", "fleet.*");
    assert_eq!(token.split('.').count(), 3, "{token}");
    let connector = swarmbus_client::Connector::new(&data.join("tls/ca.pem"), "localhost").unwrap();
    let session = swarmbus_client::Session::new("a1", swarmbus_client::Role::Agent, ["fleet.x"])
        .with_credential(token);
    let (client, _) = connector
        .connect(([127, 0, 0, 1], port).into(), session)
        .await
        .expect("an issued credential is served");
    client
        .publish(
            "fleet.x",
            swarmbus_client::Class::Command,
            bytes::Bytes::from_static(b"go"),
            swarmbus_client::PublishOptions::default(),
        )
        .await
        .unwrap();
    // Without one: refused with Unauthenticated (37).
    let bare = swarmbus_client::Session::new("a2", swarmbus_client::Role::Agent, ["fleet.x"]);
    let refused = connector
        .connect(([127, 0, 0, 1], port).into(), bare)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(37), "{refused}");
}

#[test]
fn creds_issue_refuses_an_unknown_role_and_a_bad_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    for (args, expect) in [
        (["--role", "root", "--ttl", "1h"], "--role"),
        (["--role", "agent", "--ttl", "1y"], "--ttl"),
    ] {
        let output = Command::new(ROUTER)
            .args([
                "creds",
                "issue",
                "--data-dir",
                data,
                "--agent",
                "a",
                "--swarm",
                "s",
            ])
            .args(args)
            .env("SWARMBUS_LOG", "warn")
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expect), "{stderr}");
    }
}

/// A router that requires credentials and reads `revocations.toml` in `dir`, with a
/// session of agent a1 in swarm s.
struct Revocable {
    router: Running,
    data: std::path::PathBuf,
    revocations: std::path::PathBuf,
    addr: std::net::SocketAddr,
    connector: swarmbus_client::Connector,
    client: swarmbus_client::Client,
    _deliveries: swarmbus_client::Deliveries,
}

async fn revocable(dir: &std::path::Path) -> Revocable {
    let data = dir.join("data");
    let data_arg = data.to_str().unwrap();
    let revocations = dir.join("revocations.toml");
    std::fs::write(&revocations, "").unwrap();
    let config = dir.join("router.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nmode = \"required\"\nrevocations = {:?}\n",
            revocations.to_str().unwrap()
        ),
    )
    .unwrap();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data_arg,
        "--config",
        config.to_str().unwrap(),
    ];
    let (router, line) = start(dir, &args);
    let addr = listening_on(&line);
    let connector = swarmbus_client::Connector::new(&data.join("tls/ca.pem"), "localhost").unwrap();
    let session = swarmbus_client::Session::new("a1", swarmbus_client::Role::Agent, ["s"])
        .with_credential(issue(data_arg, "a1", "s"));
    let (client, _deliveries) = connector.connect(addr, session).await.unwrap();
    Revocable {
        router,
        data,
        revocations,
        addr,
        connector,
        client,
        _deliveries,
    }
}

impl Revocable {
    /// Revokes every credential of a1 issued until a minute from now.
    fn revoke_a1(&self) {
        let later = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 60;
        std::fs::write(
            &self.revocations,
            format!("[issued_before]\na1 = {later}\n"),
        )
        .unwrap();
    }

    /// Waits for a1's session to be closed as revoked.
    async fn a1_closed(&self) {
        let closed = tokio::time::timeout(Duration::from_secs(10), self.client.closed())
            .await
            .expect("the revoked session is closed");
        assert_eq!(closed.code(), Some(37), "{closed}");
    }
}

#[tokio::test]
async fn sighup_reloads_revocations_and_closes_the_revoked_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let r = revocable(dir.path()).await;
    r.revoke_a1();
    let status = Command::new("kill")
        .args(["-HUP", &r.router.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    r.a1_closed().await;
    // The router is still up: a SIGHUP is not a stop.
    let bare = swarmbus_client::Session::new("a2", swarmbus_client::Role::Agent, ["s"]);
    let refused = r.connector.connect(r.addr, bare).await.unwrap_err();
    assert_eq!(refused.code(), Some(37), "{refused}");
}

/// `swarmbus-router reload --data-dir DIR` reloads the router running there and prints
/// the outcome; it fails when a part failed, and when no router runs there.
#[tokio::test]
async fn reload_signals_the_running_router_and_reports_the_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap().to_owned();
    let reload = || {
        Command::new(ROUTER)
            .args(["reload", "--data-dir", &data_arg, "--timeout-s", "10"])
            .output()
            .unwrap()
    };
    let nothing = reload();
    assert!(!nothing.status.success());
    let stderr = String::from_utf8_lossy(&nothing.stderr);
    assert!(stderr.contains("is a router running"), "{stderr}");
    let r = revocable(dir.path()).await;
    assert_eq!(r.data, data);
    r.revoke_a1();
    let done = reload();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&done.stdout).unwrap();
    assert_eq!(report["pid"], r.router.0.id(), "{report}");
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["auth"], "reloaded", "{report}");
    assert_eq!(report["tls"], "unchanged", "{report}");
    assert_eq!(report["closed"], 1, "{report}");
    r.a1_closed().await;
    // A revocation file that does not parse: the reload fails in part, and says why.
    std::fs::write(&r.revocations, "jti = 7\n").unwrap();
    let failed = reload();
    assert!(!failed.status.success());
    let report: serde_json::Value = serde_json::from_slice(&failed.stdout).unwrap();
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["sequence"], 2, "{report}");
    assert!(
        report["auth"]
            .as_str()
            .unwrap()
            .contains("revocations.toml"),
        "{report}"
    );
    // Killed, the router leaves its pid file: the pid is found not to run.
    drop(r);
    let stale = reload();
    assert!(!stale.status.success());
    let stderr = String::from_utf8_lossy(&stale.stderr);
    assert!(stderr.contains("stale"), "{stderr}");
}

/// `--check-config` prints the effective configuration (defaults, file, environment, flags)
/// and exits 0, or the error and 1; `--help` lists the environment variables.
#[test]
fn check_config_prints_the_effective_configuration_or_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("router.toml");
    std::fs::write(&file, "shards = 3\n[log]\nsegment_bytes = 4096\n").unwrap();
    let check = |env: &[(&str, &str)], extra: &[&str]| {
        Command::new(ROUTER)
            .args(["--config", file.to_str().unwrap(), "--check-config"])
            .args(extra)
            // Only the variables of the case: none of the caller's SWARMBUS_*.
            .env_clear()
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let valid = check(
        &[("SWARMBUS_LOG__SEGMENT_BYTES", "8192")],
        &["--shards", "5"],
    );
    assert!(
        valid.status.success(),
        "{}",
        String::from_utf8_lossy(&valid.stderr)
    );
    let printed: toml::Table = toml::from_str(&String::from_utf8_lossy(&valid.stdout)).unwrap();
    assert_eq!(printed["shards"].as_integer(), Some(5), "the flag wins");
    assert_eq!(
        printed["log"]["segment_bytes"].as_integer(),
        Some(8192),
        "the environment wins over the file"
    );
    assert_eq!(printed["admin_listen"].as_str(), Some("127.0.0.1:9464"));
    let typo = check(&[("SWARMBUS_LOG__SEGMENT_BYTS", "1")], &[]);
    assert_eq!(typo.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&typo.stderr);
    assert!(stderr.contains("SWARMBUS_LOG__SEGMENT_BYTS"), "{stderr}");
    // A file the configuration names, checked before any key was ever made.
    let no_ca = check(
        &[
            ("SWARMBUS_AUTH_MODE", "required"),
            ("SWARMBUS_AUTH__CLIENT_CA", "/nonexistent/client-ca.pem"),
        ],
        &["--data-dir", dir.path().join("fresh").to_str().unwrap()],
    );
    assert_eq!(no_ca.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no_ca.stderr).contains("client-ca.pem"));
    let invalid = check(&[("SWARMBUS_ADMIN_LISTEN", "0.0.0.0:9464")], &[]);
    assert_eq!(invalid.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&invalid.stderr).contains("loopback"));
    let help = Command::new(ROUTER).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for variable in [
        "SWARMBUS_<SECTION>__<KEY>",
        "SWARMBUS_LOG ",
        "SWARMBUS_ADMIN_LISTEN",
    ] {
        assert!(help.contains(variable), "{variable} in --help");
    }
}

/// `log.format = "json"`: one JSON object per log line on stderr.
#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(ROUTER)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("SWARMBUS_LOG", "info")
        .env("SWARMBUS_LOG__FORMAT", "json")
        .env("SWARMBUS_ADMIN_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let running = Running(child);
    let mut first = String::new();
    BufReader::new(stderr).read_line(&mut first).unwrap();
    drop(running);
    let line: serde_json::Value = serde_json::from_str(&first).expect("a JSON log line");
    assert_eq!(line["level"], "INFO", "{line}");
    assert!(line["fields"]["message"].is_string(), "{line}");
}

/// Under systemd (`Type=notify`, `NOTIFY_SOCKET`), the router says READY=1 once it serves
/// and STOPPING=1 when it stops.
#[cfg(unix)]
#[test]
fn the_service_manager_hears_ready_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let data = dir.path().join("data");
    let (router, _line) = start_with(
        dir.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())],
    );
    let mut buffer = [0u8; 256];
    let received = |buffer: &mut [u8]| {
        let n = socket.recv(buffer).expect("a notification within 30 s");
        String::from_utf8_lossy(&buffer[..n]).into_owned()
    };
    assert_eq!(received(&mut buffer), "READY=1");
    let status = Command::new("kill")
        .args(["-TERM", &router.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(received(&mut buffer), "STOPPING=1");
}
