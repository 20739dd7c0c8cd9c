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
