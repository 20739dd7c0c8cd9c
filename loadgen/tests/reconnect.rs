//! The `swarmbus-loadgen reconnect` scenario end to end: a spawned router is restarted and
//! every client comes back by itself, with jitter and without.

use std::process::Command;

#[path = "common/spawned.rs"]
mod spawned;

use spawned::{router_binary, LOADGEN};

#[test]
fn every_client_is_back_after_a_restart_with_and_without_jitter() {
    let output = Command::new(LOADGEN)
        .args(["reconnect", "--spawn-router", "--router-bin"])
        .arg(router_binary())
        .args([
            "--clients",
            "20",
            "--swarms",
            "2",
            "--base",
            "50ms",
            "--cap",
            "400ms",
            "--timeout",
            "60s",
            "--json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "loadgen failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(json["clients"], 20);
    for mode in ["jitter_on", "jitter_off"] {
        let run = &json[mode];
        assert_eq!(run["resubscribed"], 20, "{mode}: {json}");
        assert_eq!(run["reconnects"], 20, "{mode}: {json}");
        // Every client made at least one attempt after the restart, and the busiest window
        // saw at least one.
        assert!(run["attempts"].as_u64().unwrap() >= 20, "{mode}: {json}");
        assert!(
            run["max_attempts_per_100ms"].as_u64().unwrap() >= 1,
            "{mode}: {json}"
        );
        for field in ["p50", "p99", "max"] {
            assert!(
                run["resubscribe_ms"][field].is_u64(),
                "{mode}.{field}: {json}"
            );
        }
    }
    assert_eq!(json["jitter_on"]["jitter"], true);
    assert_eq!(json["jitter_off"]["jitter"], false);
}
