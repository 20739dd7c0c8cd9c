//! `durable --record` then `check` against an in-process router.

use std::process::Command;

use swarmbus_router::{Config, Router};

const LOADGEN: &str = env!("CARGO_BIN_EXE_swarmbus-loadgen");

fn last_json(output: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "no output; stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    serde_json::from_str(last).expect("the last stdout line is JSON")
}

/// The loadgen running `scenario` against `router`.
fn loadgen(scenario: &str, router: &Router) -> Command {
    let mut command = Command::new(LOADGEN);
    command
        .arg(scenario)
        .arg("--router")
        .arg(router.local_addr().to_string())
        .arg("--ca")
        .arg(router.ca_path().unwrap());
    command
}

#[test]
fn recorded_commands_are_all_found_in_the_log() {
    let data = tempfile::tempdir().unwrap();
    let record = data.path().join("record.jsonl");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let router = runtime
        .block_on(Router::start(Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: data.path().join("router"),
            admin_listen: swarmbus_router::config::AdminListen::Off,
            ..Config::default()
        }))
        .unwrap();
    let base = |scenario: &str| loadgen(scenario, &router);
    let output = base("durable")
        .args([
            "--swarms",
            "3",
            "--window",
            "16",
            "--duration",
            "700ms",
            "--json",
            "--record",
        ])
        .arg(&record)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = last_json(&output);
    let acked = report["acked"].as_u64().unwrap();
    assert!(acked > 0, "{report}");
    for key in ["p50", "p99", "p999", "max"] {
        assert!(report["ack_latency_us"].get(key).is_some(), "{report}");
    }
    assert!(report["acked_per_s"].as_f64().unwrap() > 0.0);
    let lines = std::fs::read_to_string(&record).unwrap();
    assert_eq!(lines.lines().count() as u64, acked);

    let output = base("check")
        .arg("--record")
        .arg(&record)
        .arg("--json")
        .output()
        .unwrap();
    let report = last_json(&output);
    assert!(output.status.success(), "{report}");
    assert_eq!(report["checked"].as_u64().unwrap(), acked);
    for key in ["missing", "mismatched", "gaps", "duplicate_ops"] {
        assert_eq!(report[key], 0, "{report}");
    }

    // A record the log does not match is reported, and the exit status says so.
    let tampered = lines.replacen("\"sha256\":\"", "\"sha256\":\"00", 1);
    std::fs::write(&record, tampered).unwrap();
    let output = base("check")
        .arg("--record")
        .arg(&record)
        .arg("--json")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(last_json(&output)["mismatched"], 1);
    runtime.block_on(router.shutdown());
}

/// With the log on JetStream, `check` finds what `durable --record` had acknowledged
/// through two routers (its publishers spread over them by `--router A,B`) through a third
/// router started afterwards on an empty data directory.
#[test]
fn commands_recorded_through_two_routers_are_found_through_a_third() {
    use swarmbus_jetstream::testing::NatsServer;
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(&dir.path().join("nats"), true);
    let record = dir.path().join("record.jsonl");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let start = |data: &str| {
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().join(data),
            admin_listen: swarmbus_router::config::AdminListen::Off,
            ..Config::default()
        };
        config.log.backend = swarmbus_router::config::LogBackendKind::Jetstream;
        config.jetstream.urls = vec![server.url()];
        config.jetstream.monitor_urls = vec![server.monitor_url()];
        runtime.block_on(Router::start(config)).unwrap()
    };
    let (first, second) = (start("router-a"), start("router-b"));
    // Each development router made its own CA: the loadgen trusts both.
    let both = dir.path().join("both-ca.pem");
    std::fs::write(
        &both,
        [first.ca_path().unwrap(), second.ca_path().unwrap()]
            .map(|path| std::fs::read(path).unwrap())
            .concat(),
    )
    .unwrap();
    let output = Command::new(LOADGEN)
        .arg("durable")
        .arg("--router")
        .arg(format!("{},{}", first.local_addr(), second.local_addr()))
        .arg("--ca")
        .arg(&both)
        .args([
            "--swarms",
            "3",
            "--window",
            "16",
            "--duration",
            "700ms",
            "--json",
            "--record",
        ])
        .arg(&record)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let acked = last_json(&output)["acked"].as_u64().unwrap();
    assert!(acked > 0);
    runtime.block_on(first.shutdown());
    runtime.block_on(second.shutdown());

    let third = start("router-c");
    let output = loadgen("check", &third)
        .arg("--record")
        .arg(&record)
        .arg("--json")
        .output()
        .unwrap();
    let report = last_json(&output);
    assert!(output.status.success(), "{report}");
    assert_eq!(report["checked"].as_u64().unwrap(), acked);
    for key in ["missing", "mismatched", "gaps", "duplicate_ops"] {
        assert_eq!(report[key], 0, "{report}");
    }
    runtime.block_on(third.shutdown());
}
