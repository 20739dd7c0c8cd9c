//! `jobs` against an in-process router: with workers killed at random, nothing is lost and
//! no end is handled twice.

use std::process::Command;

use swarmbus_router::{Config, Router};

const LOADGEN: &str = env!("CARGO_BIN_EXE_swarmbus-loadgen");

#[test]
fn jobs_with_worker_kills_lose_nothing_and_deliver_each_end_once() {
    let data = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data.path().join("router"),
        admin_listen: swarmbus_router::config::AdminListen::Off,
        ..Config::default()
    };
    config.jobs.backoff_base_ms = 10;
    config.jobs.backoff_cap_ms = 100;
    config.jobs.max_attempts = 50;
    let router = runtime.block_on(Router::start(config)).unwrap();
    let output = Command::new(LOADGEN)
        .args(["jobs", "--router"])
        .arg(router.local_addr().to_string())
        .arg("--ca")
        .arg(router.ca_path().unwrap())
        .args(["--submitters", "2", "--workers", "3", "--jobs", "400"])
        .args(["--job-ms", "0-2", "--kill-rate", "0.05", "--credits", "4"])
        .args(["--duplicate-rate", "0.1", "--drain", "60s", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["submitted"], 400, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["results_delivered_twice"], 0, "{report}");
    let unique = report["unique_jobs"].as_u64().unwrap();
    assert!(
        unique < 400 && unique > 0,
        "repeated keys were deduplicated: {report}"
    );
    let ended = report["completed"].as_u64().unwrap() + report["dead_lettered"].as_u64().unwrap();
    assert_eq!(ended, unique, "{report}");
    assert!(report["kills"].as_u64().unwrap() > 0, "{report}");
    for field in [
        "jobs_per_s",
        "executed_more_than_once",
        "queue_wait_us",
        "end_to_end_us",
    ] {
        assert!(report.get(field).is_some(), "{field} missing: {report}");
    }
    runtime.block_on(router.shutdown());
}
