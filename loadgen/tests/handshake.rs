//! The `swarmbus-loadgen handshake` scenario against in-process routers, with and without
//! credentials.

mod common;

#[test]
fn handshakes_are_counted_with_and_without_credentials() {
    for auth in [false, true] {
        let router = common::router(auth);
        let mut command = router.loadgen("handshake");
        command.args(["--concurrency", "2", "--duration", "300ms", "--json"]);
        if auth {
            command.arg("--creds").arg(router.creds());
        }
        let report = common::last_json(&command.output().unwrap());
        assert_eq!(router.router.stats().auth_refused, 0);
        router.shutdown();
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

/// `--client-certs`: the spawned router trusts the loadgen's client CA, and every session
/// is admitted on its certificate alone.
#[test]
fn handshakes_are_admitted_on_client_certificates() {
    let router = std::path::PathBuf::from(common::LOADGEN).with_file_name("swarmbus-router");
    assert!(
        router.exists(),
        "{} is missing: build it first (`cargo build -p swarmbus-router`, or run the \
         workspace tests)",
        router.display()
    );
    let output = std::process::Command::new(common::LOADGEN)
        .args(["handshake", "--spawn-router", "--router-bin"])
        .arg(router)
        .args([
            "--client-certs",
            "--concurrency",
            "2",
            "--duration",
            "300ms",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = common::last_json(&output);
    assert_eq!(report["identity"], "certificate", "{report}");
    assert!(report["handshakes"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
}
