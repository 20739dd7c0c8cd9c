//! For the tests that run the loadgen with `--spawn-router`: the router binary.

use std::path::PathBuf;

pub const LOADGEN: &str = env!("CARGO_BIN_EXE_swarmbus-loadgen");

/// The router binary the workspace build put beside the loadgen's.
pub fn router_binary() -> PathBuf {
    let path = PathBuf::from(LOADGEN).with_file_name("swarmbus-router");
    assert!(
        path.exists(),
        "{} is missing: this test runs a real router process; build it first \
         (`cargo build -p swarmbus-router`, or run the workspace tests)",
        path.display()
    );
    path
}
