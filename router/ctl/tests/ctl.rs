//! `swarmbus-ctl` against a live router: each subcommand's JSON, its exit codes.

use std::time::Duration;

use bytes::Bytes;
use swarmbus_client::{Connector, PublishOptions, Session};
use swarmbus_router::config::AdminListen;
use swarmbus_router::{Config, Router};
use swarmbus_schema::{Class, Role};

const CTL: &str = env!("CARGO_BIN_EXE_swarmbus-ctl");

struct Live {
    router: Router,
    ca: std::path::PathBuf,
    _data: tempfile::TempDir,
}

async fn live() -> Live {
    let data = tempfile::tempdir().unwrap();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: AdminListen::At("127.0.0.1:0".parse().unwrap()),
        data_dir: data.path().to_owned(),
        shards: 2,
        ..Config::default()
    };
    let router = Router::start(config).await.unwrap();
    let ca = router.ca_path().unwrap().to_owned();
    Live {
        router,
        ca,
        _data: data,
    }
}

impl Live {
    /// Runs `swarmbus-ctl --json ARGS` against this router: the exit code and the JSON.
    async fn ctl(&self, args: &[&str]) -> (i32, serde_json::Value, String) {
        let output = tokio::process::Command::new(CTL)
            .env_clear()
            .arg("--admin")
            .arg(self.router.admin_addr().unwrap().to_string())
            .arg("--router")
            .arg(self.router.local_addr().to_string())
            .arg("--ca")
            .arg(&self.ca)
            .arg("--json")
            .args(args)
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let json = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.code().unwrap_or(-1), json, stderr)
    }
}

#[tokio::test]
async fn every_subcommand_answers_json_from_a_live_router() {
    let t = live().await;
    let connector = Connector::new(&t.ca, "localhost").unwrap();
    let addr = t.router.local_addr();
    let (controller, _c) = connector
        .connect(addr, Session::new("ctl-test", Role::Controller, ["s"]))
        .await
        .unwrap();
    let (agent, _d) = connector
        .connect(addr, Session::new("agent-1", Role::Agent, ["s"]))
        .await
        .unwrap();
    controller
        .publish(
            "s",
            Class::Command,
            Bytes::from_static(b"x"),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    controller
        .acquire_lease("s", "leader", Duration::from_secs(30))
        .await
        .unwrap();

    let (code, status, stderr) = t.ctl(&["status"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(status["ready"], true, "{status}");
    let (code, swarms, stderr) = t.ctl(&["swarms"]).await;
    assert_eq!(code, 0, "{stderr}");
    let s = swarms
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "s")
        .unwrap_or_else(|| panic!("{swarms}"));
    assert_eq!(s["last_op"], 1);
    let (_, presence, _) = t.ctl(&["presence", "s"]).await;
    let agents: Vec<&str> = presence
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["agent"].as_str().unwrap())
        .collect();
    assert_eq!(agents, ["agent-1", "ctl-test"]);
    let (code, connections, stderr) = t.ctl(&["connections"]).await;
    assert_eq!(code, 0, "{stderr}");
    let mut agents: Vec<&str> = connections
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["agent"].as_str())
        .collect();
    agents.sort();
    assert_eq!(agents, ["agent-1", "ctl-test"], "{connections}");
    let (_, leases, _) = t.ctl(&["leases"]).await;
    assert_eq!(leases[0]["holder"], "ctl-test", "{leases}");
    let (code, jobs, _) = t.ctl(&["jobs"]).await;
    assert_eq!((code, &jobs["queued"]), (0, &serde_json::json!(0)));
    let (code, letters, _) = t.ctl(&["dead-letters", "s"]).await;
    assert_eq!((code, letters), (0, serde_json::json!([])));
    // A job no worker takes: listed, queued.
    let job = agent
        .submit_job(swarmbus_schema::SubmitJob {
            swarm: "s".into(),
            idempotency_key: "k".into(),
            payload: Bytes::from_static(b"work"),
            ..Default::default()
        })
        .await
        .unwrap();
    let (code, jobs, stderr) = t.ctl(&["jobs", "--swarm", "s"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(jobs["queued"], 1, "{jobs}");
    assert_eq!(jobs["items"][0]["job_id"], job.job_id.0, "{jobs}");
    assert_eq!(jobs["items"][0]["state"], "queued", "{jobs}");
    let (_, none, _) = t.ctl(&["jobs", "--swarm", "other"]).await;
    assert_eq!(none["items"], serde_json::json!([]), "{none}");

    // Actions, as a controller session of the ctl's own.
    let (code, done, stderr) = t.ctl(&["pause", "s"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(done["done"], "paused s");
    let (_, swarms, _) = t.ctl(&["swarms"]).await;
    let paused = swarms
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "s")
        .unwrap()["paused"]
        .clone();
    assert_eq!(paused, true);
    assert_eq!(t.ctl(&["resume", "s"]).await.0, 0);
    let (code, _, stderr) = t.ctl(&["stop-agent", "nobody", "--for", "1"]).await;
    assert_eq!(code, 0, "{stderr}");
    let (code, done, stderr) = t.ctl(&["drain", "node-x"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(done["done"], "drained node-x");
    assert_eq!(t.ctl(&["drain", "node-x", "--undo"]).await.0, 0);
    // A request the router refuses: exit 1, the reason on stderr.
    let (code, _, stderr) = t.ctl(&["redrive", "s", "999"]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(!stderr.is_empty());
}

#[tokio::test]
async fn exit_codes_tell_usage_refusal_and_unreachable_apart() {
    let t = live().await;
    // Usage: clap's 2.
    assert_eq!(t.ctl(&["presence"]).await.0, 2);
    // A view's refusal (presence needs a swarm): 1, with the view's reason.
    let output = tokio::process::Command::new(CTL)
        .env_clear()
        .args([
            "--admin",
            &t.router.admin_addr().unwrap().to_string(),
            "presence",
            "",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("swarm=NAME"));
    // Nothing listening there: 3.
    let output = tokio::process::Command::new(CTL)
        .env_clear()
        .args(["--admin", "127.0.0.1:1", "swarms"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("admin listener"), "{stderr}");
}

/// With credentials: the views and the actions take the credential file; the session is
/// the credential's subject.
#[tokio::test]
async fn a_credential_file_serves_views_and_actions() {
    let data = tempfile::tempdir().unwrap();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: AdminListen::At("127.0.0.1:0".parse().unwrap()),
        data_dir: data.path().to_owned(),
        auth: swarmbus_router::auth::AuthConfig {
            mode: swarmbus_router::auth::AuthMode::Required,
            ..Default::default()
        },
        ..Config::default()
    };
    let router = Router::start(config).await.unwrap();
    let (key, _) = swarmbus_router::auth::dev_key_paths(data.path());
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = swarmbus_router::auth::issue(
        &std::fs::read(key).unwrap(),
        &swarmbus_router::auth::Issue {
            agent: "operator".into(),
            grants: [("*".to_string(), swarmbus_router::auth::GrantRole::Admin)].into(),
            ttl_s: 600,
            now_s,
            jti: "operator-1".into(),
        },
    )
    .unwrap();
    let file = data.path().join("operator.jwt");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let ctl = |args: &[&str], with_file: bool| {
        let mut command = tokio::process::Command::new(CTL);
        command
            .env_clear()
            .arg("--admin")
            .arg(router.admin_addr().unwrap().to_string())
            .arg("--router")
            .arg(router.local_addr().to_string())
            .arg("--ca")
            .arg(router.ca_path().unwrap())
            .args(args);
        if with_file {
            command.arg("--credential-file").arg(&file);
        }
        command.output()
    };
    assert_eq!(
        ctl(&["swarms"], false).await.unwrap().status.code(),
        Some(1)
    );
    assert_eq!(ctl(&["swarms"], true).await.unwrap().status.code(), Some(0));
    let paused = ctl(&["pause", "s"], true).await.unwrap();
    assert!(
        paused.status.success(),
        "{}",
        String::from_utf8_lossy(&paused.stderr)
    );
}

#[tokio::test]
async fn status_exits_1_while_the_router_is_not_ready() {
    let t = live().await;
    let admin = t.router.admin_addr().unwrap().to_string();
    let Live { router, _data, .. } = t;
    // Shutting down: the admin listener still answers, not ready.
    let stopped = router.shutdown().await;
    let output = tokio::process::Command::new(CTL)
        .env_clear()
        .args(["--admin", &admin, "--json", "status"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stdout} {stderr}");
    let status: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(status["ready"], false, "{status}");
    assert!(stderr.contains("shutting down"), "{stderr}");
    drop(stopped);
}
