//! The client's compiled examples, run against a router.

use std::path::PathBuf;
use std::time::Duration;

use crate::common::start_router;

/// The binary of the client's example `name`: `cargo test --workspace` (the README's test
/// command, `scripts/test`) builds the examples of every package beside the test binaries.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/main-<hash> -> target/<profile>/examples/<name>
    let profile = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path = profile.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is not built: run the tests with `scripts/test` (cargo test --workspace), which builds the examples",
        path.display()
    );
    path
}

#[tokio::test]
async fn the_controller_example_leads_commands_and_pauses_its_swarm() {
    let t = start_router(|_| {}).await;
    let ca = t
        .router
        .ca_path()
        .expect("the test router runs on a development CA");
    let run = tokio::process::Command::new(example("controller"))
        .arg(t.router.local_addr().to_string())
        .arg(ca)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the controller example finished within 30 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("leader with token "), "{stdout}");
    // Five stamped commands, the first ops of a new swarm, in order.
    for step in 0..5 {
        let line = format!("command {step} is op {}", step + 1);
        assert!(stdout.contains(&line), "{line:?} not in {stdout}");
    }
    assert!(stdout.contains("paused and resumed swarm-a"), "{stdout}");
}
