//! The `swarmbus-loadgen storm` scenario end to end against an in-process router whose
//! limits make the storm certain to trip the breaker.

use std::process::Command;

use swarmbus_router::{Config, Router};

const LOADGEN: &str = env!("CARGO_BIN_EXE_swarmbus-loadgen");

/// Agents may publish 20 commands/s: the well-behaved ones send 5/s, the stormer far more
/// (even on a slow machine whose acknowledgements take tens of ms).
/// 20 refusals open the breaker; it half-opens after 200 ms.
const LIMITS: &str = r#"
[rate_limits.roles.agent]
command = { rate_per_s = 20.0, burst = 20.0 }

[rate_limits.breaker]
failures = 20
window_ms = 1000
open_ms = 200
probes = 5
"#;

#[test]
fn storm_reports_refusals_breaker_transitions_and_no_loss() {
    let data = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let router = runtime
        .block_on(Router::start(Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: data.path().to_owned(),
            admin_listen: swarmbus_router::config::AdminListen::Off,
            ..Config::from_toml(LIMITS).unwrap()
        }))
        .unwrap();
    let output = Command::new(LOADGEN)
        .args(["storm", "--router"])
        .arg(router.local_addr().to_string())
        .arg("--ca")
        .arg(router.ca_path().unwrap())
        .args(["--agents", "2", "--command-rate", "5", "--payload", "64B"])
        .args(["--storm-concurrency", "8"])
        .args(["--duration", "500ms", "--drain", "5s", "--json"])
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
        "baseline_command_latency_us",
        "storm_command_latency_us",
        "baseline_ack_latency_us",
        "storm_ack_latency_us",
        "p99_ratio",
        "breaker_transitions",
        "breaker_states_seen",
        "refused",
        "rate_limited",
        "circuit_open",
        "storm_attempts",
        "commands_lost",
    ] {
        assert!(report.get(key).is_some(), "{key} missing from {report}");
    }
    for phase in ["baseline_command_latency_us", "storm_command_latency_us"] {
        for key in ["p50", "p99"] {
            assert!(report[phase].get(key).is_some(), "{phase}.{key}: {report}");
        }
    }
    assert_eq!(report["scenario"], "storm");
    assert!(report["commands_acked"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["commands_lost"], 0, "{report}");
    assert_eq!(report["command_duplicates"], 0, "{report}");
    let refused = report["refused"].as_u64().unwrap();
    assert!(refused > 0, "the storm was never refused: {report}");
    assert!(report["rate_limited"].as_u64().unwrap() > 0, "{report}");
    assert!(
        report["storm_attempts"].as_u64().unwrap() > refused,
        "{report}"
    );
    let states = report["breaker_states_seen"].as_array().unwrap();
    assert!(
        states.iter().any(|s| s == "open"),
        "no open transition seen: {report}"
    );
    assert!(report["breaker_transitions"].as_u64().unwrap() >= 1);
    // Only the stormer trips its breaker.
    assert_eq!(report["breaker_transitions_other_agents"], 0, "{report}");
}
