//! Client certificates (mTLS): with `auth.client_ca`, a session without a credential is
//! identified by the certificate its handshake verified (the URI SAN under
//! `auth.cert_uri_prefix`, else the common name) and granted what the policy grants that
//! id; certificates of another CA or revoked by a CRL are refused, and a reload of the CRLs
//! and the policy closes the sessions they no longer allow.

use std::path::PathBuf;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use swarmbus_client::{Client, ClientError, Connector, Role, Session};
use swarmbus_router::auth::{AuthMode, GrantRole, Issue};

use crate::common::{now_s, signing_key, start_router, works, TestRouter};

const UNAUTHENTICATED: u64 = 37;
const FORBIDDEN: u64 = 25;

/// An operator's CA for client certificates.
struct ClientCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A client certificate and its key, PEM.
struct Leaf {
    cert: String,
    key: String,
}

impl ClientCa {
    fn new(name: &str) -> ClientCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key).unwrap().pem();
        ClientCa {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A client certificate with common name `cn`, the URI SANs `uris`, and `serial`.
    fn leaf(&self, cn: &str, uris: &[&str], serial: u64) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = uris
            .iter()
            .map(|uri| SanType::URI(uri.to_string().try_into().unwrap()))
            .collect();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(SerialNumber::from(serial));
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A CRL revoking `serials`.
    fn crl(&self, serials: &[u64]) -> String {
        let params = CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2024, 1, 1),
            next_update: rcgen::date_time_ymd(2124, 1, 1),
            crl_number: SerialNumber::from(serials.len() as u64 + 1),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from(*serial),
                    revocation_time: rcgen::date_time_ymd(2024, 1, 1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer).unwrap().pem().unwrap()
    }
}

/// The files a router with client certificates reads: the CA, a CRL, the policy.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new(ca: &ClientCa, crl: &str, policy: &str) -> Files {
        let files = Files {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::write(files.path("ca.pem"), &ca.pem).unwrap();
        files.write_crl(crl);
        files.write_policy(policy);
        files
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write_crl(&self, crl: &str) {
        std::fs::write(self.path("revoked.crl.pem"), crl).unwrap();
    }

    fn write_policy(&self, policy: &str) {
        std::fs::write(self.path("policy.toml"), policy).unwrap();
    }
}

async fn router_with(files: &Files) -> TestRouter {
    start_router(|c| {
        c.auth.mode = AuthMode::Required;
        c.auth.client_ca = Some(files.path("ca.pem"));
        c.auth.client_crls = vec![files.path("revoked.crl.pem")];
        c.auth.policy = Some(files.path("policy.toml"));
    })
    .await
}

/// A connector that presents `leaf` and trusts the router's development CA (from memory).
fn presenting(t: &TestRouter, leaf: &Leaf) -> Connector {
    let ca = std::fs::read(t.router.ca_path().unwrap()).unwrap();
    Connector::builder("localhost")
        .trust_pem(ca)
        .client_certificate_pem(leaf.cert.as_bytes(), leaf.key.as_bytes())
        .build()
        .unwrap()
}

async fn connect(
    t: &TestRouter,
    connector: &Connector,
    agent: &str,
    role: Role,
    swarm: &str,
) -> Result<Client, ClientError> {
    connector
        .connect(t.router.local_addr(), Session::new(agent, role, [swarm]))
        .await
        .map(|(client, _)| client)
}

async fn closed_with(client: &Client, code: u64) {
    let closed = tokio::time::timeout(Duration::from_secs(10), client.closed())
        .await
        .expect("the session is closed");
    assert_eq!(closed.code(), Some(code), "{closed}");
}

const POLICY: &str = "[certificates]\ngrants = { \"fleet.*\" = \"agent\" }\n\
                      [identities.ctl]\ngrants = { \"ops\" = \"controller\" }\n";

#[tokio::test]
async fn a_client_certificate_names_the_agent_and_the_policy_grants_it() {
    let ca = ClientCa::new("operator CA");
    let files = Files::new(&ca, &ca.crl(&[]), POLICY);
    let t = router_with(&files).await;
    // The URI SAN under the prefix names the agent; its common name does not count.
    let a1 = presenting(
        &t,
        &ca.leaf("not-the-id", &["spiffe://x/y", "swarmbus://agent/a1"], 1),
    );
    let client = connect(&t, &a1, "a1", Role::Agent, "fleet.one")
        .await
        .unwrap();
    works(&client, "fleet.one").await;
    // Another agent id, a role or a swarm not granted: Forbidden, saying why.
    for (agent, role, swarm) in [
        ("not-the-id", Role::Agent, "fleet.one"),
        ("a1", Role::Controller, "fleet.one"),
        ("a1", Role::Agent, "ops"),
    ] {
        let refused = connect(&t, &a1, agent, role, swarm).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Some(FORBIDDEN),
            "{agent} {role:?} {swarm}: {refused}"
        );
    }
    // URI SANs, none under the prefix: no agent id (the common name does not count then).
    let other_workload = presenting(&t, &ca.leaf("ctl", &["spiffe://x/ctl"], 2));
    let refused = connect(&t, &other_workload, "ctl", Role::Controller, "ops")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(UNAUTHENTICATED), "{refused}");
    assert!(
        refused.to_string().contains("names no agent id"),
        "{refused}"
    );
    // No URI SAN at all: the common name is the id, with its own grants.
    let ctl = presenting(&t, &ca.leaf("ctl", &[], 4));
    let controller = connect(&t, &ctl, "ctl", Role::Controller, "ops")
        .await
        .unwrap();
    works(&controller, "ops").await;
    let refused = connect(&t, &ctl, "ctl", Role::Agent, "fleet.one")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(FORBIDDEN), "{refused}");
    // A credential in the Hello identifies the session instead of the certificate.
    let key = signing_key(t._data.as_ref().unwrap().path());
    let token = swarmbus_router::auth::issue(
        &key,
        &Issue {
            agent: "tok".into(),
            grants: [("lab".to_string(), GrantRole::Worker)].into(),
            ttl_s: 600,
            now_s: now_s(),
            jti: "tok-1".into(),
        },
    )
    .unwrap();
    let (with_token, _) = a1
        .connect(
            t.router.local_addr(),
            Session::new("tok", Role::Worker, ["lab"]).with_credential(token),
        )
        .await
        .unwrap();
    works(&with_token, "lab").await;
    // Neither a credential nor a certificate: refused, naming both.
    let refused = connect(&t, &t.connector, "a1", Role::Agent, "fleet.one")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(UNAUTHENTICATED), "{refused}");
    assert!(
        refused.to_string().contains("client certificate"),
        "{refused}"
    );
    works(&client, "fleet.one").await;
}

#[tokio::test]
async fn a_certificate_of_another_ca_is_refused_and_the_router_carries_on() {
    let ca = ClientCa::new("operator CA");
    let files = Files::new(&ca, &ca.crl(&[]), POLICY);
    let t = router_with(&files).await;
    let good = presenting(&t, &ca.leaf("a1", &[], 1));
    let client = connect(&t, &good, "a1", Role::Agent, "fleet.one")
        .await
        .unwrap();
    let stranger = ClientCa::new("someone else's CA");
    let forged = presenting(&t, &stranger.leaf("a2", &[], 1));
    let refused = connect(&t, &forged, "a2", Role::Agent, "fleet.one").await;
    let refused = refused.expect_err("a certificate of another CA is refused");
    assert!(refused.to_string().contains("UnknownIssuer"), "{refused}");
    // The same agent id under the wrong CA does not displace the session that holds it.
    let impostor = presenting(&t, &stranger.leaf("a1", &[], 1));
    assert!(connect(&t, &impostor, "a1", Role::Agent, "fleet.one")
        .await
        .is_err());
    works(&client, "fleet.one").await;
    let again = connect(
        &t,
        &presenting(&t, &ca.leaf("a3", &[], 3)),
        "a3",
        Role::Agent,
        "fleet.x",
    )
    .await
    .unwrap();
    works(&again, "fleet.x").await;
}

#[tokio::test]
async fn a_reload_of_the_crl_and_the_policy_closes_the_sessions_they_no_longer_allow() {
    let ca = ClientCa::new("operator CA");
    let files = Files::new(&ca, &ca.crl(&[]), POLICY);
    let t = router_with(&files).await;
    let (leaf_a, leaf_b, leaf_c) = (
        ca.leaf("a", &[], 10),
        ca.leaf("b", &[], 11),
        ca.leaf("c", &[], 12),
    );
    let a = connect(&t, &presenting(&t, &leaf_a), "a", Role::Agent, "fleet.one")
        .await
        .unwrap();
    let b = connect(&t, &presenting(&t, &leaf_b), "b", Role::Agent, "fleet.one")
        .await
        .unwrap();
    let c = connect(&t, &presenting(&t, &leaf_c), "c", Role::Agent, "fleet.one")
        .await
        .unwrap();
    assert_eq!(t.router.reload_auth().unwrap(), 0, "nothing changed yet");
    // b's certificate revoked: its session closes, and it cannot come back.
    files.write_crl(&ca.crl(&[11]));
    assert_eq!(t.router.reload_auth().unwrap(), 1);
    closed_with(&b, UNAUTHENTICATED).await;
    assert!(
        connect(&t, &presenting(&t, &leaf_b), "b", Role::Agent, "fleet.one")
            .await
            .is_err(),
        "a revoked certificate is refused in the handshake"
    );
    works(&a, "fleet.one").await;
    // The policy now grants certificates only ops: a and c lose fleet.one...
    files.write_policy("[identities.a]\ngrants = { \"fleet.*\" = \"agent\" }\n");
    assert_eq!(t.router.reload_auth().unwrap(), 1);
    closed_with(&c, FORBIDDEN).await;
    // ...except a, which the policy still grants by name.
    works(&a, "fleet.one").await;
    // A CRL that does not parse changes nothing.
    files.write_crl("not a CRL");
    assert!(t.router.reload_auth().is_err());
    works(&a, "fleet.one").await;
}

#[tokio::test]
async fn client_certificates_need_auth_required_and_readable_files() {
    let dir = tempfile::tempdir().unwrap();
    let config = |adjust: &dyn Fn(&mut swarmbus_router::Config)| {
        let mut config = swarmbus_router::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_owned(),
            admin_listen: swarmbus_router::config::AdminListen::Off,
            ..swarmbus_router::Config::default()
        };
        adjust(&mut config);
        config
    };
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ClientCa::new("ca").pem).unwrap();
    let refusals = [
        config(&|c| c.auth.client_ca = Some(ca.clone())),
        config(&|c| {
            c.auth.mode = AuthMode::Required;
            c.auth.client_crls = vec![ca.clone()];
        }),
        config(&|c| {
            c.auth.mode = AuthMode::Required;
            c.auth.client_ca = Some(dir.path().join("missing.pem"));
        }),
        config(&|c| {
            c.auth.mode = AuthMode::Required;
            c.auth.client_ca = Some(ca.clone());
            // A certificate is not a CRL.
            c.auth.client_crls = vec![ca.clone()];
        }),
    ];
    let reasons = [
        "auth.mode",
        "client_crls is set without",
        "missing.pem",
        "no CRL",
    ];
    for (refused, reason) in refusals.into_iter().zip(reasons) {
        let error = swarmbus_router::Router::start(refused).await.err();
        let error = error.expect("the router refuses to start");
        let error = swarmbus_router::error::report(&error);
        assert!(error.contains(reason), "{reason}: {error}");
    }
}
