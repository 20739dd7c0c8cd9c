//! A router in this process for the loadgen binary to run against.

use std::path::PathBuf;
use std::process::{Command, Output};

use swarmbus_router::{Config, Router};

pub const LOADGEN: &str = env!("CARGO_BIN_EXE_swarmbus-loadgen");

/// A router on 127.0.0.1 port 0 with its own data dir and runtime; `auth`: it requires
/// credentials (signed with its development key, see [`InProcess::creds`]).
pub struct InProcess {
    pub runtime: tokio::runtime::Runtime,
    pub router: Router,
    pub data: tempfile::TempDir,
}

pub fn router(auth: bool) -> InProcess {
    let data = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data.path().to_owned(),
        admin_listen: swarmbus_router::config::AdminListen::Off,
        ..Config::default()
    };
    if auth {
        config.auth.mode = swarmbus_router::auth::AuthMode::Required;
    }
    let router = runtime.block_on(Router::start(config)).unwrap();
    InProcess {
        runtime,
        router,
        data,
    }
}

impl InProcess {
    /// `swarmbus-loadgen SCENARIO --router ADDR --ca CA`.
    pub fn loadgen(&self, scenario: &str) -> Command {
        let mut command = Command::new(LOADGEN);
        command
            .args([scenario, "--router"])
            .arg(self.router.local_addr().to_string())
            .arg("--ca")
            .arg(self.router.ca_path().unwrap());
        command
    }

    /// The signing key the router trusts (its development key), for `--creds`.
    pub fn creds(&self) -> PathBuf {
        swarmbus_router::auth::dev_key_paths(self.data.path()).0
    }

    pub fn shutdown(self) {
        self.runtime.block_on(self.router.shutdown());
    }
}

/// The JSON object on the last stdout line of a run that succeeded.
pub fn last_json(output: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "loadgen failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON")
}
