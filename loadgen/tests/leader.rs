//! `swarmbus-loadgen leader` against an in-process router: contenders paused and killed at
//! random never overlap as holders, and no stale command is acted on.

use std::process::Command;

use swarmbus_router::{Config, Router};

const LOADGEN: &str = env!("CARGO_BIN_EXE_swarmbus-loadgen");

#[test]
fn paused_and_killed_leaders_never_overlap_and_stale_commands_are_not_acted_on() {
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
        .args(["leader", "--router"])
        .arg(router.local_addr().to_string())
        .arg("--ca")
        .arg(router.ca_path().unwrap())
        .args([
            "--contenders",
            "3",
            "--duration",
            "2s",
            "--pause-prob",
            "0.3",
        ])
        .args(["--drain", "10s", "--json"])
        .output()
        .unwrap();
    runtime.block_on(router.shutdown());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "loadgen failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a JSON line")).unwrap();
    for key in [
        "grants",
        "max_token",
        "overlapping_holders",
        "stale_commands_accepted",
        "renewals",
        "lease_lost",
        "stale_refused",
        "pauses",
        "kills",
        "commands_accepted",
        "commands_lost",
        "handover_gap_ms",
    ] {
        assert!(report.get(key).is_some(), "{key} missing from {report}");
    }
    assert_eq!(report["scenario"], "leader");
    assert_eq!(report["contenders"], 3);
    assert_eq!(report["kill_prob"], 0.15, "half of --pause-prob: {report}");
    let grants = report["grants"].as_u64().unwrap();
    assert!(grants >= 1, "{report}");
    // A fresh router: tokens start at 1 and every one granted was heard by a contender.
    assert_eq!(report["max_token"].as_u64().unwrap(), grants, "{report}");
    assert_eq!(report["overlapping_holders"], 0, "{report}");
    assert_eq!(report["shared_tokens"], 0, "{report}");
    assert_eq!(report["stale_commands_accepted"], 0, "{report}");
    assert!(
        report["commands_accepted"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_eq!(report["commands_lost"], 0, "{report}");
    assert_eq!(report["drained"], true, "{report}");
    // Holders were disturbed, and every paused one acted once on waking up.
    let pauses = report["pauses"].as_u64().unwrap();
    assert!(pauses + report["kills"].as_u64().unwrap() >= 1, "{report}");
    assert_eq!(
        report["late_commands"].as_u64().unwrap(),
        pauses,
        "{report}"
    );
    assert_eq!(report["errors"], 0, "{report}");
}

#[test]
fn bad_arguments_are_refused() {
    let output = Command::new(LOADGEN)
        .args(["leader", "--spawn-router", "--pause-prob", "1.5"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--pause-prob"), "{stderr}");
}
