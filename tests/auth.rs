//! Credentials: a router with `auth.mode = "required"` serves the sessions whose credential
//! it trusts, for their own agent id and within their grants, and refuses the others with a
//! stable code while it carries on.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use swarmbus_client::{Class, ClientError, PublishOptions, Role, Session};
use swarmbus_router::auth::{AuthMode, GrantRole, Issue};

use crate::common::{now_s, signing_key, start_router, works, TestRouter};

const UNAUTHENTICATED: u64 = 37;
const FORBIDDEN: u64 = 25;
const INVALID_REQUEST: u64 = 11;

/// A router that requires credentials, signed with the development key of its data dir.
async fn secured(leeway_s: u64) -> (TestRouter, Vec<u8>) {
    let t = start_router(|c| {
        c.auth.mode = AuthMode::Required;
        c.auth.leeway_s = leeway_s;
    })
    .await;
    let key = signing_key(t._data.as_ref().unwrap().path());
    (t, key)
}

fn credential(key: &[u8], agent: &str, grants: &[(&str, GrantRole)], ttl_s: u64) -> String {
    let issue = Issue {
        agent: agent.into(),
        grants: grants
            .iter()
            .map(|(pattern, role)| (pattern.to_string(), *role))
            .collect::<BTreeMap<_, _>>(),
        ttl_s,
        now_s: now_s(),
        jti: format!("{agent}-{ttl_s}"),
    };
    swarmbus_router::auth::issue(key, &issue).unwrap()
}

/// A router that requires credentials and reads its policy from `path`, with its
/// development signing key.
async fn with_policy(path: &std::path::Path) -> (TestRouter, Vec<u8>) {
    let path = path.to_owned();
    let t = start_router(|c| {
        c.auth.mode = AuthMode::Required;
        c.auth.policy = Some(path);
    })
    .await;
    let key = signing_key(t._data.as_ref().unwrap().path());
    (t, key)
}

async fn connect(
    t: &TestRouter,
    agent: &str,
    role: Role,
    swarms: &[&str],
    token: Option<String>,
) -> Result<swarmbus_client::Client, ClientError> {
    let mut session = Session::new(agent, role, swarms.iter().copied());
    if let Some(token) = token {
        session = session.with_credential(token);
    }
    t.connector
        .connect(t.router.local_addr(), session)
        .await
        .map(|(client, _)| client)
}

/// A session of `agent` in swarm `s`, with a credential of its own granting it.
async fn agent_in_s(t: &TestRouter, key: &[u8], agent: &str) -> swarmbus_client::Client {
    let token = credential(key, agent, &[("s", GrantRole::Agent)], 600);
    connect(t, agent, Role::Agent, &["s"], Some(token))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_valid_credential_is_served_and_a_missing_one_refused() {
    let (t, key) = secured(30).await;
    let token = credential(&key, "a", &[("fleet.*", GrantRole::Agent)], 600);
    let a = connect(&t, "a", Role::Agent, &["fleet.one"], Some(token))
        .await
        .unwrap();
    works(&a, "fleet.one").await;
    let refused = connect(&t, "b", Role::Agent, &["fleet.one"], None)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(UNAUTHENTICATED), "{refused}");
    works(&a, "fleet.one").await;
    assert_eq!(t.router.stats().auth_refused, 1);
}

#[tokio::test]
async fn bad_credentials_are_refused_with_their_code_and_the_router_carries_on() {
    let (t, key) = secured(0).await;
    let good = agent_in_s(&t, &key, "good").await;
    let now = now_s();
    let signed = |claims: serde_json::Value| swarmbus_router::auth::sign(&key, &claims).unwrap();
    let claims = serde_json::json!({
        "sub": "a", "grants": {"s": "agent"}, "exp": now + 600, "iat": now, "jti": "j",
    });
    let with = |key: &str, value: serde_json::Value| {
        let mut claims = claims.clone();
        claims[key] = value;
        claims
    };
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    // A valid token whose payload is changed afterwards (to grant every swarm).
    let tampered = {
        let valid = signed(claims.clone());
        let parts: Vec<&str> = valid.split('.').collect();
        let more = with("grants", serde_json::json!({"*": "admin"}));
        format!("{}.{}.{}", parts[0], b64.encode(more.to_string()), parts[2])
    };
    // The same claims, unsigned, under `alg: none`.
    let unsigned = format!(
        "{}.{}.",
        b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims.to_string())
    );
    // Another key, the same claims.
    let other_dir = tempfile::tempdir().unwrap();
    let (other_key, _) = swarmbus_router::auth::ensure_dev_key(other_dir.path()).unwrap();
    let other_key = std::fs::read(other_key).unwrap();
    let without_jti = {
        let mut claims = claims.clone();
        claims.as_object_mut().unwrap().remove("jti");
        claims
    };
    let cases: Vec<(&str, String, u64, &str)> = vec![
        (
            "expired",
            signed(with("exp", (now - 60).into())),
            UNAUTHENTICATED,
            "expired",
        ),
        (
            "not yet valid",
            signed(with("nbf", (now + 3_600).into())),
            UNAUTHENTICATED,
            "not valid yet",
        ),
        (
            "another key",
            swarmbus_router::auth::sign(&other_key, &claims).unwrap(),
            UNAUTHENTICATED,
            "not signed by a key",
        ),
        ("alg none", unsigned, UNAUTHENTICATED, "alg EdDSA"),
        (
            "tampered payload",
            tampered,
            UNAUTHENTICATED,
            "not signed by a key",
        ),
        (
            "an unknown claim",
            signed(with("admin", true.into())),
            UNAUTHENTICATED,
            "claims",
        ),
        ("no jti", signed(without_jti), UNAUTHENTICATED, "claims"),
        (
            "not a JWT",
            "not-a-jwt".into(),
            UNAUTHENTICATED,
            "malformed",
        ),
        (
            "oversized",
            "x".repeat(4_096),
            INVALID_REQUEST,
            "credential",
        ),
    ];
    for (what, token, code, reason) in cases {
        let refused = connect(&t, "a", Role::Agent, &["s"], Some(token))
            .await
            .expect_err(what);
        assert_eq!(refused.code(), Some(code), "{what}: {refused}");
        assert!(refused.to_string().contains(reason), "{what}: {refused}");
    }
    works(&good, "s").await;
}

#[tokio::test]
async fn a_credential_is_bound_to_its_agent_id_and_its_grants() {
    let (t, key) = secured(30).await;
    let grants = [
        ("fleet.*", GrantRole::Agent),
        ("ops", GrantRole::Controller),
    ];
    let token = || Some(credential(&key, "a", &grants, 600));
    let cases: Vec<(&str, &str, Role, &[&str])> = vec![
        ("another agent id", "b", Role::Agent, &["fleet.x"]),
        (
            "a swarm not granted",
            "a",
            Role::Agent,
            &["fleet.x", "other"],
        ),
        ("a role not granted", "a", Role::Worker, &["fleet.x"]),
        (
            "the agent role where controller is granted",
            "a",
            Role::Agent,
            &["ops"],
        ),
        (
            "the router's agent id",
            "swarmbus-router",
            Role::Agent,
            &["fleet.x"],
        ),
    ];
    for (what, agent, role, swarms) in cases {
        let refused = connect(&t, agent, role, swarms, token())
            .await
            .expect_err(what);
        assert_eq!(refused.code(), Some(FORBIDDEN), "{what}: {refused}");
    }
    let controller = connect(&t, "a", Role::Controller, &["ops"], token())
        .await
        .unwrap();
    works(&controller, "ops").await;
    // Admin grants every role.
    let admin = credential(&key, "root", &[("*", GrantRole::Admin)], 600);
    let worker = connect(&t, "root", Role::Worker, &["any"], Some(admin))
        .await
        .unwrap();
    works(&worker, "any").await;
}

#[tokio::test]
async fn another_identity_cannot_take_over_an_agent_id() {
    let (t, key) = secured(30).await;
    let a = agent_in_s(&t, &key, "a").await;
    // b's own credential, claiming to be a: refused, and a is not replaced.
    let b = credential(&key, "b", &[("s", GrantRole::Agent)], 600);
    let refused = connect(&t, "a", Role::Agent, &["s"], Some(b))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(FORBIDDEN), "{refused}");
    works(&a, "s").await;
}

#[tokio::test]
async fn a_refreshed_credential_keeps_the_session_past_the_first_ones_expiry() {
    let (t, key) = secured(0).await;
    let grants = [("s", GrantRole::Agent)];
    let short = || Some(credential(&key, "a", &grants, 2));
    let refreshed = connect(&t, "a", Role::Agent, &["s"], short())
        .await
        .unwrap();
    let unrefreshed = connect(&t, "b", Role::Agent, &["s"], {
        Some(credential(&key, "b", &grants, 2))
    })
    .await
    .unwrap();
    // A refresh for another agent id, or one that no longer grants the swarm, is refused;
    // the session keeps its credential.
    let wrong = refreshed
        .refresh_credential(&credential(&key, "b", &grants, 600))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Some(FORBIDDEN), "{wrong}");
    let narrower = refreshed
        .refresh_credential(&credential(&key, "a", &[("t", GrantRole::Agent)], 600))
        .await
        .unwrap_err();
    assert_eq!(narrower.code(), Some(FORBIDDEN), "{narrower}");
    refreshed
        .refresh_credential(&credential(&key, "a", &grants, 600))
        .await
        .unwrap();
    // Past the first credential's expiry (2 s, whole seconds): the refreshed session goes
    // on; the other one was closed with Unauthenticated.
    let closed = tokio::time::timeout(Duration::from_secs(10), unrefreshed.closed())
        .await
        .expect("the session without a fresh credential is closed");
    assert_eq!(closed.code(), Some(UNAUTHENTICATED), "{closed}");
    works(&refreshed, "s").await;
}

#[tokio::test]
async fn a_router_without_auth_answers_a_refresh_with_invalid_request() {
    let t = start_router(|_| {}).await;
    let (client, _) = t.connect("a", Role::Agent, &["s"]).await;
    let refused = client.refresh_credential("x.y.z").await.unwrap_err();
    assert_eq!(refused.code(), Some(INVALID_REQUEST), "{refused}");
}

#[tokio::test]
async fn only_a_router_that_requires_credentials_listens_beyond_loopback() {
    let data = tempfile::tempdir().unwrap();
    let config = |mode| swarmbus_router::Config {
        listen: "0.0.0.0:0".parse().unwrap(),
        data_dir: data.path().to_owned(),
        admin_listen: swarmbus_router::config::AdminListen::Off,
        auth: swarmbus_router::auth::AuthConfig {
            mode,
            ..Default::default()
        },
        ..swarmbus_router::Config::default()
    };
    let refused = swarmbus_router::Router::start(config(AuthMode::None))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("auth.mode"), "{refused}");
    let router = swarmbus_router::Router::start(config(AuthMode::Required))
        .await
        .unwrap();
    assert!(router.local_addr().ip().is_unspecified());
    router.shutdown().await;
}

#[tokio::test]
async fn safety_actions_stay_within_what_the_credential_grants() {
    let (t, key) = secured(30).await;
    let ops = credential(&key, "ctl", &[("ops", GrantRole::Controller)], 600);
    let controller = connect(&t, "ctl", Role::Controller, &["ops"], Some(ops))
        .await
        .unwrap();
    controller.pause("ops").await.unwrap();
    controller.resume("ops").await.unwrap();
    let elsewhere = controller.pause("fleet").await.unwrap_err();
    assert_eq!(elsewhere.code(), Some(FORBIDDEN), "{elsewhere}");
    let stop = controller
        .stop_agent("someone", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(stop.code(), Some(FORBIDDEN), "{stop}");
    // Controller granted everywhere: stops and drains pass.
    let all = credential(&key, "boss", &[("*", GrantRole::Controller)], 600);
    let boss = connect(&t, "boss", Role::Controller, &["ops"], Some(all))
        .await
        .unwrap();
    boss.stop_agent("someone", Duration::from_secs(1))
        .await
        .unwrap();
    // A session joining no swarm still needs its role granted somewhere.
    let agent_only = credential(&key, "a", &[("fleet.*", GrantRole::Agent)], 600);
    let refused = connect(&t, "a", Role::Controller, &[], Some(agent_only))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(FORBIDDEN), "{refused}");
}

#[tokio::test]
async fn a_controller_cancels_others_jobs_only_in_the_swarms_it_joined() {
    let (t, key) = secured(30).await;
    let submitter = agent_in_s(&t, &key, "submitter").await;
    let submit = |k: &str| swarmbus_client::SubmitJob {
        swarm: "s".into(),
        idempotency_key: k.into(),
        payload: bytes::Bytes::from_static(b"work"),
        ..swarmbus_client::SubmitJob::default()
    };
    let first = submitter.submit_job(submit("k1")).await.unwrap();
    let second = submitter.submit_job(submit("k2")).await.unwrap();
    let grants = [("ops", GrantRole::Controller), ("s", GrantRole::Controller)];
    let token = |_: ()| Some(credential(&key, "ctl", &grants, 600));
    let outside = connect(&t, "ctl", Role::Controller, &["ops"], token(()))
        .await
        .unwrap();
    let refused = outside.cancel_job(first.job_id).await.unwrap_err();
    assert_eq!(refused.code(), Some(FORBIDDEN), "{refused}");
    let inside = connect(&t, "ctl", Role::Controller, &["s"], token(()))
        .await
        .unwrap();
    inside.cancel_job(second.job_id).await.unwrap();
}

#[tokio::test]
async fn a_reload_closes_the_sessions_whose_credentials_are_revoked() {
    let revocations = tempfile::NamedTempFile::new().unwrap();
    let path = revocations.path().to_owned();
    let t = start_router(|c| {
        c.auth.mode = AuthMode::Required;
        c.auth.revocations = Some(path.clone());
    })
    .await;
    let key = signing_key(t._data.as_ref().unwrap().path());
    let a = agent_in_s(&t, &key, "a").await;
    let b = agent_in_s(&t, &key, "b").await;
    let c = agent_in_s(&t, &key, "c").await;
    assert_eq!(t.router.reload_auth().unwrap(), 0, "nothing revoked yet");
    // a's credential by its jti (see `credential`), and every credential of b issued
    // before a minute from now.
    std::fs::write(
        &path,
        format!("jti = [\"a-600\"]\n[issued_before]\nb = {}\n", now_s() + 60),
    )
    .unwrap();
    assert_eq!(t.router.reload_auth().unwrap(), 2);
    for client in [&a, &b] {
        let closed = tokio::time::timeout(Duration::from_secs(10), client.closed())
            .await
            .expect("a revoked session is closed");
        assert_eq!(closed.code(), Some(UNAUTHENTICATED), "{closed}");
    }
    works(&c, "s").await;
    // A revoked credential is refused at connect too, saying so.
    let token = credential(&key, "a", &[("s", GrantRole::Agent)], 600);
    let refused = connect(&t, "a", Role::Agent, &["s"], Some(token))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(UNAUTHENTICATED), "{refused}");
    assert!(refused.to_string().contains("revoked"), "{refused}");
    // A revocation file that does not parse changes nothing.
    std::fs::write(&path, "jti = 7\n").unwrap();
    assert!(t.router.reload_auth().is_err());
    works(&c, "s").await;
}

#[tokio::test]
async fn a_reload_reads_keys_and_never_makes_one() {
    let (t, key) = secured(30).await;
    let a = agent_in_s(&t, &key, "a").await;
    let data = t._data.as_ref().unwrap().path();
    let (private, public) = swarmbus_router::auth::dev_key_paths(data);
    let moved = data.join("moved.pem");
    std::fs::rename(&public, &moved).unwrap();
    assert!(
        t.router.reload_auth().is_err(),
        "a missing key fails the reload"
    );
    assert!(!public.exists(), "and no key is made in its place");
    assert_eq!(std::fs::read(&private).unwrap(), key);
    works(&a, "s").await;
    std::fs::rename(&moved, &public).unwrap();
    assert_eq!(t.router.reload_auth().unwrap(), 0);
    works(&a, "s").await;
}

#[tokio::test]
async fn the_policy_denies_by_role_and_identity_and_reloads() {
    let policy = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        policy.path(),
        "[roles.agent]\ndeny = [\"publish:*:control\", \"subscribe:secret\"]\n\
         [identities.boss]\ndeny = [\"lease:ops:leader\", \"safety:ops\"]\n\
         [identities.chief]\ndeny = [\"safety:ops\"]\n",
    )
    .unwrap();
    let path = policy.path().to_owned();
    let (t, key) = with_policy(&path).await;
    let grants = [("s", GrantRole::Agent), ("secret", GrantRole::Agent)];
    let agent = connect(
        &t,
        "a",
        Role::Agent,
        &["s", "secret"],
        Some(credential(&key, "a", &grants, 600)),
    )
    .await
    .unwrap();
    let control = agent
        .publish(
            "s",
            Class::Control,
            bytes::Bytes::from_static(b"x"),
            PublishOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(control.code(), Some(FORBIDDEN), "{control}");
    assert!(
        control.to_string().contains("publish:*:control"),
        "{control}"
    );
    works(&agent, "s").await;
    let secret = agent
        .subscribe("secret", Class::Command, None)
        .await
        .unwrap_err();
    assert_eq!(secret.code(), Some(FORBIDDEN), "{secret}");
    // Nor can it read them through a delta.
    let delta = agent
        .delta("secret", swarmbus_client::OpId(1), swarmbus_client::OpId(0))
        .await
        .unwrap_err();
    assert_eq!(delta.code(), Some(FORBIDDEN), "{delta}");
    agent.subscribe("s", Class::Command, None).await.unwrap();
    let boss = connect(
        &t,
        "boss",
        Role::Controller,
        &["ops"],
        Some(credential(
            &key,
            "boss",
            &[("ops", GrantRole::Controller)],
            600,
        )),
    )
    .await
    .unwrap();
    let ttl = Duration::from_secs(10);
    let leader = boss.acquire_lease("ops", "leader", ttl).await.unwrap_err();
    assert_eq!(leader.code(), Some(FORBIDDEN), "{leader}");
    boss.acquire_lease("ops", "other", ttl).await.unwrap();
    let pause = boss.pause("ops").await.unwrap_err();
    assert_eq!(pause.code(), Some(FORBIDDEN), "{pause}");
    // `safety:ops` bounds pauses of ops, not a stop, which names no swarm.
    let chief = connect(
        &t,
        "chief",
        Role::Controller,
        &["ops"],
        Some(credential(
            &key,
            "chief",
            &[("*", GrantRole::Controller)],
            600,
        )),
    )
    .await
    .unwrap();
    assert_eq!(
        chief.pause("ops").await.unwrap_err().code(),
        Some(FORBIDDEN)
    );
    chief
        .stop_agent("someone", Duration::from_secs(1))
        .await
        .unwrap();
    // The policy is read again on a reload: without its denials, the lease is granted.
    std::fs::write(policy.path(), "").unwrap();
    t.router.reload_auth().unwrap();
    boss.acquire_lease("ops", "leader", ttl).await.unwrap();
    boss.pause("ops").await.unwrap();
}

#[tokio::test]
async fn a_policy_reload_drops_the_subscriptions_it_now_denies() {
    let policy = tempfile::NamedTempFile::new().unwrap();
    let path = policy.path().to_owned();
    let (t, key) = with_policy(&path).await;
    let subscriber = |agent: &'static str, role: Role, grant: GrantRole| {
        let token = credential(&key, agent, &[("s", grant)], 600);
        let session = Session::new(agent, role, ["s"]).with_credential(token);
        t.connector.connect(t.router.local_addr(), session)
    };
    let (agent, mut agent_deliveries) = subscriber("a", Role::Agent, GrantRole::Agent)
        .await
        .unwrap();
    let (controller, mut controller_deliveries) =
        subscriber("boss", Role::Controller, GrantRole::Controller)
            .await
            .unwrap();
    for client in [&agent, &controller] {
        client.subscribe("s", Class::Command, None).await.unwrap();
        client
            .subscribe("s", Class::Reconciliation, None)
            .await
            .unwrap();
    }
    std::fs::write(&path, "[roles.agent]\ndeny = [\"subscribe:s:command\"]\n").unwrap();
    assert_eq!(t.router.reload_auth().unwrap(), 0, "no session is closed");
    let publish = |class| {
        controller.publish(
            "s",
            class,
            bytes::Bytes::from_static(b"after"),
            PublishOptions::default(),
        )
    };
    publish(Class::Command).await.unwrap();
    publish(Class::Reconciliation).await.unwrap();
    // The controller, not denied, gets both; the agent only the status, its command
    // subscription dropped.
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(10), controller_deliveries.recv())
            .await
            .unwrap()
            .unwrap();
    }
    let first = tokio::time::timeout(Duration::from_secs(10), agent_deliveries.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.class, Class::Reconciliation);
    let more = tokio::time::timeout(Duration::from_millis(300), agent_deliveries.recv()).await;
    assert!(more.is_err(), "nothing more for the agent: {more:?}");
    // Subscribing again is refused by the policy now.
    let again = agent
        .subscribe("s", Class::Command, None)
        .await
        .unwrap_err();
    assert_eq!(again.code(), Some(FORBIDDEN), "{again}");
    works(&agent, "s").await;
}

#[tokio::test]
async fn an_affine_session_belongs_to_the_identity_that_opened_it() {
    let (t, key) = secured(30).await;
    let worker_token = credential(&key, "gpu-1", &[("fleet", GrantRole::Worker)], 600);
    let worker = connect(&t, "gpu-1", Role::Worker, &["fleet"], Some(worker_token))
        .await
        .unwrap();
    let status = swarmbus_client::WorkerStatus {
        node: "gpu-1".into(),
        zone: "z1".into(),
        gpu_count: 1,
        models: vec!["llama".into()],
        ..Default::default()
    };
    worker.register_worker(status).await.unwrap();
    let owner = agent_in_s(&t, &key, "a").await;
    let other = agent_in_s(&t, &key, "b").await;
    owner.open_session("chat-1", Some("llama")).await.unwrap();
    // Another identity can neither renew, close nor send requests into it.
    let renew = other
        .open_session("chat-1", Some("llama"))
        .await
        .unwrap_err();
    assert_eq!(renew.code(), Some(FORBIDDEN), "{renew}");
    let close = other.close_session("chat-1").await.unwrap_err();
    assert_eq!(close.code(), Some(FORBIDDEN), "{close}");
    let request = other
        .request_worker(
            Some("chat-1"),
            None,
            bytes::Bytes::from_static(b"x"),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
    assert_eq!(request.code(), Some(FORBIDDEN), "{request}");
    assert!(request.to_string().contains("\"a\""), "{request}");
    // Its own key is its own; the owner keeps its session and closes it.
    other.open_session("chat-2", Some("llama")).await.unwrap();
    owner.open_session("chat-1", Some("llama")).await.unwrap();
    owner.close_session("chat-1").await.unwrap();
    // Once closed, the key is free again.
    other.open_session("chat-1", Some("llama")).await.unwrap();
}

/// What each role may do in a matrix: every action of [`attempt`], by role.
const ACTIONS: [&str; 11] = [
    "publish",
    "subscribe",
    "lease",
    "pause",
    "stop",
    "config",
    "presence",
    "jobs.submit",
    "dead-letters",
    "worker",
    "affinity",
];

/// Tries `action` in swarm `s` (pauses in `p`): `true` unless refused with `Forbidden` (an
/// action allowed may still fail for other reasons, e.g. no worker for an affine session).
async fn attempt(client: &swarmbus_client::Client, role: Role, action: &str) -> bool {
    let x = || bytes::Bytes::from_static(b"x");
    let result: Result<(), ClientError> = match action {
        "publish" => client
            .publish("s", Class::Command, x(), PublishOptions::default())
            .await
            .map(drop),
        "subscribe" => client.subscribe("s", Class::Command, None).await,
        "lease" => client
            .acquire_lease("s", "leader", Duration::from_secs(30))
            .await
            .map(drop),
        "pause" => match client.pause("p").await {
            Ok(()) => client.resume("p").await,
            Err(error) => Err(error),
        },
        "stop" => client.stop_agent("nobody", Duration::from_secs(1)).await,
        "config" => client.set_config("s", "k", x()).await.map(drop),
        "presence" => client.presence("s").await.map(drop),
        "jobs.submit" => client
            .submit_job(swarmbus_client::SubmitJob {
                swarm: "s".into(),
                idempotency_key: format!("{role:?}-{}", now_s()),
                payload: x(),
                ..Default::default()
            })
            .await
            .map(drop),
        "dead-letters" => client
            .dead_letters("s", swarmbus_client::JobId(0), 10)
            .await
            .map(drop),
        "worker" => client
            .register_worker(swarmbus_client::WorkerStatus {
                node: format!("node-{role:?}"),
                zone: "z".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "affinity" => client
            .open_session(&format!("chat-{role:?}"), None)
            .await
            .map(drop),
        other => panic!("no action {other}"),
    };
    !matches!(result, Err(error) if error.code() == Some(FORBIDDEN))
}

/// The actions `client` (in `role`) may take, of [`ACTIONS`].
async fn allowed_actions(client: &swarmbus_client::Client, role: Role) -> Vec<&'static str> {
    let mut allowed = Vec::new();
    for action in ACTIONS {
        let tried = tokio::time::timeout(Duration::from_secs(20), attempt(client, role, action));
        if tried
            .await
            .unwrap_or_else(|_| panic!("{role:?} {action}: no answer"))
        {
            allowed.push(action);
        }
    }
    allowed
}

#[tokio::test]
async fn a_role_by_action_matrix_follows_the_roles_and_the_policy() {
    let policy = tempfile::NamedTempFile::new().unwrap();
    let path = policy.path().to_owned();
    let (t, key) = with_policy(&path).await;
    let mut sessions = Vec::new();
    for (agent, role) in [
        ("an-agent", Role::Agent),
        ("a-controller", Role::Controller),
        ("a-worker", Role::Worker),
    ] {
        // Granted everything: what is refused is what the role or the policy refuses.
        let token = credential(&key, agent, &[("*", GrantRole::Admin)], 600);
        let client = connect(&t, agent, role, &["s", "p"], Some(token))
            .await
            .unwrap();
        sessions.push((role, client));
    }
    let everyone = [
        "publish",
        "subscribe",
        "lease",
        "presence",
        "jobs.submit",
        "affinity",
    ];
    let with = |more: &[&'static str]| {
        let mut actions: Vec<&str> = everyone.to_vec();
        actions.extend_from_slice(more);
        ACTIONS
            .into_iter()
            .filter(|a| actions.contains(a))
            .collect::<Vec<_>>()
    };
    let controller_only = ["pause", "stop", "config", "dead-letters"];
    let by_default = [with(&[]), with(&controller_only), with(&["worker"])];
    for ((role, client), expected) in sessions.iter().zip(&by_default) {
        assert_eq!(&allowed_actions(client, *role).await, expected, "{role:?}");
    }
    // The policy gives agents a pause of p and the dead letters of s, allows and denies
    // them the configuration of s (the denial wins), and takes actions away from each role.
    std::fs::write(
        &path,
        "[roles.agent]\nallow = [\"safety:p\", \"config:s\", \"jobs.redrive:s\"]\n\
         deny = [\"presence:s\", \"config:s\"]\n\
         [roles.controller]\ndeny = [\"config:s\", \"lease:s:leader\", \"jobs.submit:s\"]\n\
         [roles.worker]\ndeny = [\"worker\", \"affinity\"]\n",
    )
    .unwrap();
    assert_eq!(t.router.reload_auth().unwrap(), 0);
    let drop_from = |actions: Vec<&'static str>, gone: &[&str]| -> Vec<&'static str> {
        actions.into_iter().filter(|a| !gone.contains(a)).collect()
    };
    let under_policy = [
        // config is allowed and denied: the denial wins.
        drop_from(with(&["pause", "dead-letters"]), &["presence"]),
        drop_from(with(&controller_only), &["config", "lease", "jobs.submit"]),
        drop_from(with(&[]), &["affinity"]),
    ];
    for ((role, client), expected) in sessions.iter().zip(&under_policy) {
        assert_eq!(&allowed_actions(client, *role).await, expected, "{role:?}");
    }
    // An allow of an action that every role has, or that needs the worker role, is refused.
    for bad in ["publish:*", "worker", "jobs.take", "presence:s"] {
        std::fs::write(&path, format!("[roles.agent]\nallow = [\"{bad}\"]\n")).unwrap();
        assert!(t.router.reload_auth().is_err(), "{bad}");
    }
}
