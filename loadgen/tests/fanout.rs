//! The `swarmbus-loadgen fanout` scenario end to end against an in-process router.

use std::process::Command;

use swarmbus_router::{Config, Router};

mod common;

const LOADGEN: &str = env!("CARGO_BIN_EXE_swarmbus-loadgen");

fn run_fanout(class: &str) -> serde_json::Value {
    run_fanout_with(class, &[])
}

fn run_fanout_with(class: &str, extra: &[&std::ffi::OsStr]) -> serde_json::Value {
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
        .args(["fanout", "--router"])
        .arg(router.local_addr().to_string())
        .arg("--ca")
        .arg(router.ca_path().unwrap())
        .args([
            "--swarms",
            "2",
            "--agents",
            "3",
            "--payload",
            "64B",
            "--rate",
            "200",
        ])
        .args(["--duration", "500ms", "--class", class, "--json"])
        .args(extra)
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
    serde_json::from_str(last).expect("the last stdout line is JSON")
}

#[test]
fn fanout_reports_what_agents_received() {
    for class in ["telemetry", "command"] {
        let report = run_fanout(class);
        for key in [
            "scenario",
            "class",
            "swarms",
            "agents",
            "payload_bytes",
            "duration_s",
            "sent",
            "delivered",
            "expected",
            "lost",
            "duplicates",
            "reordered",
            "delivered_per_s",
        ] {
            assert!(report.get(key).is_some(), "{key} missing from {report}");
        }
        for key in ["p50", "p90", "p99", "p999", "max"] {
            assert!(
                report["latency_us"].get(key).is_some(),
                "latency_us.{key} missing"
            );
        }
        assert_eq!(report["scenario"], "fanout");
        assert_eq!(report["class"], class);
        let sent = report["sent"].as_u64().unwrap();
        assert!(sent > 0, "{report}");
        // At this low rate nothing is shed: every agent gets every message exactly once.
        assert_eq!(report["expected"].as_u64().unwrap(), sent * 3);
        assert_eq!(report["delivered"], report["expected"], "{report}");
        assert_eq!(report["lost"], 0);
        assert_eq!(report["duplicates"], 0);
        assert_eq!(report["reordered"], 0);
        assert_eq!(report["op_gaps"], 0);
    }
}

#[test]
fn bad_arguments_are_refused() {
    let output = Command::new(LOADGEN)
        .args(["fanout", "--spawn-router", "--payload", "8B", "--json"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("at least 16 bytes"));
}

/// Against a router that requires credentials, `--creds` (a key it trusts) gives every
/// agent its own; without it the run fails on the first connect.
#[test]
fn fanout_runs_against_a_router_that_requires_credentials() {
    let router = common::router(true);
    let run = |creds: bool| {
        let mut command = router.loadgen("fanout");
        command
            .args(["--swarms", "1", "--agents", "2", "--payload", "64B"])
            .args(["--rate", "100", "--duration", "300ms", "--json"]);
        if creds {
            command.arg("--creds").arg(router.creds());
        }
        command.output().unwrap()
    };
    let report = common::last_json(&run(true));
    assert!(report["delivered"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    let refused = run(false);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("37"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    router.shutdown();
}

#[test]
fn report_dir_holds_the_summary_series_interval_log_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let report_dir = dir.path().join("run");
    let summary = run_fanout_with("command", &["--report".as_ref(), report_dir.as_os_str()]);
    let read = |name: &str| {
        std::fs::read_to_string(report_dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    // The summary is the JSON line the run printed.
    let written: serde_json::Value = serde_json::from_str(&read("summary.json")).unwrap();
    assert_eq!(written, summary);
    // One row per second; together they count every delivery the summary counts.
    let series: serde_json::Value = serde_json::from_str(&read("series.json")).unwrap();
    let rows = series.as_array().unwrap();
    assert!(!rows.is_empty(), "{series}");
    let counted: u64 = rows.iter().map(|r| r["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, summary["delivered"].as_u64().unwrap());
    assert!(
        rows.iter().any(|r| r["p99_us"].as_u64().unwrap() > 0),
        "{series}"
    );
    let csv = read("series.csv");
    assert_eq!(csv.lines().count(), rows.len() + 1, "{csv}");
    assert!(csv.starts_with("t_s,count,per_s,p50_us,"), "{csv}");
    let hlog = read("latency.hlog");
    let intervals = hlog.lines().filter(|l| !l.starts_with('#')).count();
    assert_eq!(intervals, rows.len(), "{hlog}");
    for plot in [
        "latency_over_time.svg",
        "throughput.svg",
        "latency_distribution.svg",
    ] {
        let svg = read(plot);
        assert!(
            svg.starts_with("<svg") && svg.contains("<polyline"),
            "{plot}"
        );
    }
}

/// `--ceiling` runs the same clients through the bare forwarder: everything arrives once, in
/// order, and the run names its target and reports both processes' CPU seconds.
#[test]
fn the_ceiling_runs_through_the_bare_forwarder() {
    let output = Command::new(LOADGEN)
        .args(["fanout", "--ceiling", "--swarms", "2", "--agents", "3"])
        .args(["--payload", "64B", "--rate", "200", "--duration", "500ms"])
        .args(["--json"])
        .output()
        .unwrap();
    let report = common::last_json(&output);
    assert_eq!(report["target"], "forwarder");
    let sent = report["sent"].as_u64().unwrap();
    assert!(sent > 0, "{report}");
    assert_eq!(report["delivered"].as_u64().unwrap(), sent * 3, "{report}");
    assert_eq!(report["duplicates"], 0);
    assert_eq!(report["reordered"], 0);
    let cpu = &report["cpu"];
    // Clock ticks are 10 ms: a short run may read 0 s, never nothing.
    assert!(cpu["loadgen_s"].as_f64().is_some(), "{report}");
    assert!(cpu["forwarder_s"].as_f64().is_some(), "{report}");
    assert!(cpu["loadgen_below_forwarder"].is_boolean(), "{report}");

    // Commands need a log: the forwarder refuses to stand in for one.
    let output = Command::new(LOADGEN)
        .args(["fanout", "--ceiling", "--class", "command", "--json"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("telemetry only"));
}

/// Against a router given by address, its CPU is reported only with `--router-pid`; without
/// an address at all the run says what it needs.
#[test]
fn the_router_cpu_is_reported_when_its_process_is_known() {
    let report = run_fanout_with(
        "telemetry",
        &[
            "--router-pid".as_ref(),
            std::process::id().to_string().as_ref(),
        ],
    );
    assert_eq!(report["target"], "router");
    assert!(report["cpu"]["router_s"].as_f64().is_some(), "{report}");
    let report = run_fanout("telemetry");
    assert!(report["cpu"]["router_s"].is_null(), "{report}");
    assert!(report["cpu"]["loadgen_s"].as_f64().is_some(), "{report}");

    let output = Command::new(LOADGEN)
        .args(["fanout", "--json"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--router HOST:PORT") && stderr.contains("--spawn-router"),
        "{stderr}"
    );
}
