//! The `swarmbus-loadgen affinity-sim` scenario: JSON shape and the invariants that hold
//! whatever the seed.

use std::process::Command;

const LOADGEN: &str = env!("CARGO_BIN_EXE_swarmbus-loadgen");
const NODES: usize = 8;
const SESSIONS: usize = 4000;

fn run_sim(extra: &[&str]) -> serde_json::Value {
    let output = Command::new(LOADGEN)
        .arg("affinity-sim")
        .args(["--nodes", &NODES.to_string()])
        .args(["--models", "30", "--zipf", "1.0"])
        .args(["--sessions", &SESSIONS.to_string()])
        .args(extra)
        .arg("--json")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "loadgen failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().expect("a JSON line");
    serde_json::from_str(last).expect("the last stdout line is JSON")
}

fn policy<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["policies"]
        .as_array()
        .expect("policies is an array")
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("policy {name} missing from {report}"))
}

#[test]
fn affinity_sim_reports_every_policy() {
    let report = run_sim(&["--seed", "3"]);
    let policies = report["policies"].as_array().expect("policies is an array");
    let names: Vec<&str> = policies.iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, ["round-robin", "ring", "rendezvous", "swarmbus"]);
    for p in policies {
        for key in [
            "cache_hit_rate",
            "max_over_avg_load",
            "moved_on_failure",
            "moved_on_addition",
        ] {
            let value = p[key].as_f64().unwrap_or_else(|| panic!("{key} in {p}"));
            assert!(value.is_finite() && value >= 0.0, "{key} = {value} in {p}");
        }
        assert!(p["cache_hit_rate"].as_f64().unwrap() <= 1.0, "{p}");
        assert!(p["max_over_avg_load"].as_f64().unwrap() >= 1.0, "{p}");
    }
}

#[test]
fn swarmbus_moves_only_what_it_must() {
    for seed in ["1", "2", "3"] {
        let report = run_sim(&["--seed", seed]);
        let swarmbus = policy(&report, "swarmbus");
        // Sticky sessions: a newcomer takes new sessions only.
        assert_eq!(
            swarmbus["moved_on_addition"].as_f64(),
            Some(0.0),
            "{report}"
        );
        // Only the failed node's sessions move: at most its bound, ceil(1.25 x average)
        // with the N nodes and S/2 sessions of that moment, over all sessions.
        let at_failure = (SESSIONS / 2) as f64;
        let moved = swarmbus["moved_on_failure"].as_f64().unwrap();
        let failed_bound = (1.25 * at_failure / NODES as f64).ceil();
        assert!(moved <= failed_bound / at_failure, "{report}");
        // ... and close to 1/N from below too: no node idles far under the average.
        assert!(moved >= 0.5 / NODES as f64, "{report}");
        // No node above ceil(1.25 x average) right after the failure (N - 1 nodes) or at
        // the end (N nodes again).
        let ceiling_ratio = |sessions: f64, nodes: f64| {
            let average = sessions / nodes;
            (1.25 * average).ceil() / average
        };
        let limit = ceiling_ratio(at_failure, (NODES - 1) as f64)
            .max(ceiling_ratio(SESSIONS as f64, NODES as f64));
        let spread = swarmbus["max_over_avg_load"].as_f64().unwrap();
        assert!(spread <= limit + 1e-9, "{report}");
        // The model cache pays: well above a policy blind to it.
        let hit = swarmbus["cache_hit_rate"].as_f64().unwrap();
        let round_robin = policy(&report, "round-robin")["cache_hit_rate"]
            .as_f64()
            .unwrap();
        assert!(hit >= 2.0 * round_robin, "{report}");
        // Round-robin without a session table reshuffles almost everything.
        let rr_moved = policy(&report, "round-robin")["moved_on_failure"]
            .as_f64()
            .unwrap();
        assert!(rr_moved > 0.5, "{report}");
    }
}

#[test]
fn the_same_seed_gives_the_same_run() {
    assert_eq!(run_sim(&["--seed", "9"]), run_sim(&["--seed", "9"]));
}
