//! `swarmbus-loadgen chaos` end to end, against a router it spawns: every session through
//! a fault proxy of its own (5% loss, 2% duplication, 5% reordering), random partitions of
//! 1 to 5 s, and kills. The scenario judges what each side observed; these tests check its
//! verdict and that the faults they name happened.

use std::process::Command;

#[path = "common/spawned.rs"]
mod spawned;

use spawned::{router_binary, LOADGEN};

/// Runs the scenario with the faults every test shares and `extra` (five minutes at most:
/// a run that hangs fails); its JSON report.
fn chaos(seed: u64, extra: &[&str]) -> serde_json::Value {
    let output = Command::new("timeout")
        .args(["300", LOADGEN, "chaos", "--spawn-router", "--router-bin"])
        .arg(router_binary())
        .args(["--seed", &seed.to_string(), "--duration", "12s"])
        .args(["--loss", "0.05", "--duplicate", "0.02", "--reorder", "0.05"])
        .args(["--partitions", "--partition-length", "1s-5s"])
        .args(["--partition-gap", "1s-4s", "--drain", "60s", "--json"])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "chaos seed {seed} failed (replay: swarmbus-loadgen chaos --spawn-router --seed \
         {seed} ...): {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.lines().last().expect("a JSON line")).unwrap()
}

fn count(report: &serde_json::Value, key: &str) -> u64 {
    report[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {report}"))
}

/// What every run must show, whatever its faults.
fn nothing_broke(report: &serde_json::Value) {
    for key in [
        "lost",
        "duplicated_applies",
        "reordered_applies",
        "lease_overlaps",
        "stale_commands_accepted",
        "ghosts",
        "presence_missing",
        "jobs_lost",
        "job_results_twice",
        "job_results_wrong",
        "contenders_stuck",
    ] {
        assert_eq!(count(report, key), 0, "{key}: {report}");
    }
    assert_eq!(report["drained"], true, "{report}");
    let faults = &report["faults"];
    for key in ["dropped", "duplicated", "reordered"] {
        assert!(faults[key].as_u64().unwrap() > 0, "{key}: {report}");
    }
    assert!(count(report, "acked") > 0, "{report}");
    // Every agent applied every acknowledged command (`lost` is 0), and maybe commands
    // whose acknowledgement the network lost.
    assert!(
        count(report, "applied") >= 3 * count(report, "acked"),
        "{report}"
    );
}

#[test]
fn partitioned_agents_and_lease_holders_keep_one_holder_lose_nothing_and_leave_no_ghost() {
    let report = chaos(7, &[]);
    nothing_broke(&report);
    // Sessions were cut off, for longer than the lease's TTL and the heartbeat timeout,
    // and the lease changed hands (a cut-off holder's lease ran out).
    assert!(count(&report["faults"], "partitions") >= 5, "{report}");
    assert!(count(&report, "lease_grants") >= 2, "{report}");
    assert!(report["presence_converged_ms"].is_u64(), "{report}");
    assert_eq!(count(&report, "agent_kills"), 0, "{report}");
}

#[test]
fn jobs_through_worker_kills_and_partitions_end_once_each() {
    let report = chaos(11, &["--kill-agents", "--kill-every", "3s"]);
    nothing_broke(&report);
    assert!(count(&report, "worker_kills") >= 1, "{report}");
    assert!(count(&report, "agent_kills") >= 1, "{report}");
    assert!(count(&report, "jobs_accepted") > 0, "{report}");
    assert!(
        count(&report, "job_leases") >= count(&report, "jobs_accepted"),
        "{report}"
    );
}

#[test]
fn bad_arguments_are_refused() {
    let output = Command::new(LOADGEN)
        .args(["chaos", "--spawn-router", "--loss", "1.5"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--loss"), "{stderr}");
    let output = Command::new(LOADGEN)
        .args(["chaos", "--spawn-router", "--partition-length", "5s-1s"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("empty"));
}
