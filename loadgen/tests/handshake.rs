//! The `swarmbus-loadgen handshake` scenario against in-process routers, with and without
//! credentials.

use std::process::Command;

use swarmbus_router::{Config, Router};

const LOADGEN: &str = env!("CARGO_BIN_EXE_swarmbus-loadgen");

fn run(auth: bool) -> serde_json::Value {
    let data = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data.path().to_owned(),
        ..Config::default()
    };
    if auth {
        config.auth.mode = swarmbus_router::auth::AuthMode::Required;
    }
    let router = runtime.block_on(Router::start(config)).unwrap();
    let mut command = Command::new(LOADGEN);
    command
        .args(["handshake", "--router"])
        .arg(router.local_addr().to_string())
        .arg("--ca")
        .arg(router.ca_path().unwrap())
        .args(["--concurrency", "2", "--duration", "300ms", "--json"]);
    if auth {
        command
            .arg("--creds")
            .arg(swarmbus_router::auth::dev_key_paths(data.path()).0);
    }
    let output = command.output().unwrap();
    let stats = router.stats();
    runtime.block_on(router.shutdown());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "loadgen failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stats.auth_refused, 0);
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn handshakes_are_counted_with_and_without_credentials() {
    for auth in [false, true] {
        let report = run(auth);
        assert_eq!(report["scenario"], "handshake");
        assert!(report["handshakes"].as_u64().unwrap() > 0, "{report}");
        assert_eq!(report["errors"], 0, "{report}");
        assert!(
            report["handshakes_per_s"].as_f64().unwrap() > 0.0,
            "{report}"
        );
        assert!(report["latency_us"]["p99"].as_u64().is_some(), "{report}");
    }
}
