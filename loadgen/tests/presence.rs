//! `swarmbus-loadgen presence` against an in-process router with fast heartbeats: killed
//! agents are seen leaving by every watcher, on timeout (frozen) or on close, and no ghost
//! stays behind.

use std::process::Command;

use swarmbus_router::{Config, Router};

const LOADGEN: &str = env!("CARGO_BIN_EXE_swarmbus-loadgen");

fn run_presence(kill_mode: &str, agents: &str, kill: &str) -> serde_json::Value {
    let data = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data.path().to_owned(),
        admin_listen: swarmbus_router::config::AdminListen::Off,
        ..Config::default()
    };
    config.presence.heartbeat_interval_ms = 100;
    let router = runtime.block_on(Router::start(config)).unwrap();
    let output = Command::new(LOADGEN)
        .args(["presence", "--router"])
        .arg(router.local_addr().to_string())
        .arg("--ca")
        .arg(router.ca_path().unwrap())
        .args(["--agents", agents, "--heartbeat-ms", "100", "--kill", kill])
        .args(["--kill-mode", kill_mode, "--timeout", "60s", "--json"])
        .output()
        .unwrap();
    runtime.block_on(router.shutdown());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "loadgen failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.lines().last().expect("a JSON line")).unwrap()
}

#[test]
fn frozen_agents_are_declared_gone_by_the_heartbeat_timeout_without_ghosts() {
    let report = run_presence("timeout", "20", "3");
    for key in [
        "leave_detect_ms",
        "ghosts",
        "leaves_seen",
        "killed",
        "agents",
    ] {
        assert!(report.get(key).is_some(), "{key} missing from {report}");
    }
    for quantile in ["p50", "p99", "max"] {
        assert!(
            report["leave_detect_ms"][quantile].is_u64(),
            "{quantile}: {report}"
        );
    }
    assert_eq!(report["scenario"], "presence");
    assert_eq!(report["agents"], 20);
    assert_eq!(report["killed"], 3);
    assert_eq!(report["leaves_seen"], report["killed"], "{report}");
    assert_eq!(report["ghosts"], 0, "{report}");
    // Frozen, not closed: the router had to notice the silence.
    assert_eq!(report["leave_reasons"]["timeout"], 3, "{report}");
    assert!(report["leave_reasons"].get("closed").is_none(), "{report}");
    assert_eq!(report["heartbeat_timeout_ms"], 300, "{report}");
    // Everyone else is still listed: 17 agents and the 4 watchers.
    assert_eq!(report["members"], 21, "{report}");
    assert_eq!(report["members_missing"], 0, "{report}");
}

#[test]
fn closed_agents_leave_at_once_without_ghosts() {
    let report = run_presence("close", "10", "2");
    assert_eq!(report["kill_mode"], "close");
    assert_eq!(report["leaves_seen"], 2, "{report}");
    assert_eq!(report["ghosts"], 0, "{report}");
    assert_eq!(report["leave_reasons"]["closed"], 2, "{report}");
}

#[test]
fn bad_arguments_are_refused() {
    let output = Command::new(LOADGEN)
        .args(["presence", "--spawn-router", "--agents", "2", "--kill", "5"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--kill"), "{stderr}");
}
