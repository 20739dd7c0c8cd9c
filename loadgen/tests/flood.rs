//! The `swarmbus-loadgen flood` scenario end to end against an in-process router.

use std::process::Command;

use swarmbus_router::{Config, Router};

const LOADGEN: &str = env!("CARGO_BIN_EXE_swarmbus-loadgen");

#[test]
fn flood_reports_command_latency_loss_and_shedding() {
    let data = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let router = runtime
        .block_on(Router::start(Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: data.path().to_owned(),
            admin_listen: swarmbus_router::config::AdminListen::Off,
            ..Config::default()
        }))
        .unwrap();
    let output = Command::new(LOADGEN)
        .args(["flood", "--router"])
        .arg(router.local_addr().to_string())
        .arg("--ca")
        .arg(router.ca_path().unwrap())
        .args(["--agents", "2", "--command-rate", "200", "--payload", "64B"])
        // Bounds the wait for stragglers, so the run stops by itself.
        .args(["--duration", "500ms", "--drain", "30s", "--json"])
        .output()
        .unwrap();
    runtime.block_on(router.shutdown());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "loadgen failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().expect("a JSON line");
    let report: serde_json::Value = serde_json::from_str(last).expect("the last line is JSON");

    for key in [
        "idle_command_latency_us",
        "flood_command_latency_us",
        "idle_ack_latency_us",
        "flood_ack_latency_us",
        "p99_ratio",
        "commands_lost",
        "telemetry_shed",
        "router_rss_max_bytes",
        "commands_sent",
        "commands_acked",
        "telemetry_sent",
        "telemetry_received",
        "agents",
        "command_rate",
        "duration_s",
    ] {
        assert!(report.get(key).is_some(), "{key} missing from {report}");
    }
    for phase in ["idle_command_latency_us", "flood_command_latency_us"] {
        for key in ["p50", "p99"] {
            assert!(
                report[phase][key].is_u64(),
                "{phase}.{key} missing: {report}"
            );
        }
    }
    assert_eq!(report["scenario"], "flood");
    assert_eq!(report["agents"], 2);
    let acked = report["commands_acked"].as_u64().unwrap();
    assert!(acked > 0, "{report}");
    assert_eq!(report["commands_lost"], 0, "{report}");
    assert_eq!(report["commands_received"], acked, "one receiver: {report}");
    assert_eq!(report["command_duplicates"], 0, "{report}");
    assert!(report["p99_ratio"].as_f64().is_some(), "{report}");
    let sent = report["telemetry_sent"].as_i64().unwrap();
    let received = report["telemetry_received"].as_i64().unwrap();
    assert!(sent > 0, "the flooders published nothing: {report}");
    assert!(received <= sent, "{report}");
    assert_eq!(report["telemetry_shed"].as_i64().unwrap(), sent - received);
    // The router was not spawned, so its memory was not sampled.
    assert!(report["router_rss_max_bytes"].is_null(), "{report}");
}

#[test]
fn bad_arguments_are_refused() {
    let output = Command::new(LOADGEN)
        .args(["flood", "--spawn-router", "--command-rate", "0", "--json"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--command-rate"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // A router configuration only makes sense for a router the loadgen starts.
    let output = Command::new(LOADGEN)
        .args(["flood", "--router", "127.0.0.1:1", "--ca", "ca.pem"])
        .args(["--router-config", "router.toml"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--spawn-router"));
}
