//! The server certificate reloaded at run time: new connections get the new one, and the
//! connections made before keep working.

use bytes::Bytes;
use swarmbus_client::{Class, Connector, PublishOptions, Role, Session};
use swarmbus_router::tls::ensure_dev_tls;
use swarmbus_router::{Config, Router};

#[tokio::test]
async fn a_reloaded_certificate_is_served_to_new_connections_and_old_ones_carry_on() {
    // Two certificate authorities, each with a server certificate for localhost.
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (
        ensure_dev_tls(first.path()).unwrap(),
        ensure_dev_tls(second.path()).unwrap(),
    );
    let served = tempfile::tempdir().unwrap();
    let (cert, key) = (
        served.path().join("cert.pem"),
        served.path().join("key.pem"),
    );
    std::fs::copy(&a.server_cert, &cert).unwrap();
    std::fs::copy(&a.server_key, &key).unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data.path().to_owned(),
        admin_listen: swarmbus_router::config::AdminListen::Off,
        ..Config::default()
    };
    config.tls.cert = Some(cert.clone());
    config.tls.key = Some(key.clone());
    let router = Router::start(config).await.unwrap();
    let addr = router.local_addr();
    let trusting = |ca: &std::path::Path| Connector::new(ca, "localhost").unwrap();
    let session = |agent: &str| Session::new(agent, Role::Agent, ["s"]);
    let (before, _deliveries) = trusting(&a.ca_cert)
        .connect(addr, session("before"))
        .await
        .unwrap();
    assert!(trusting(&b.ca_cert)
        .connect(addr, session("b"))
        .await
        .is_err());
    // A file that is not a certificate: the reload fails and changes nothing.
    std::fs::write(&cert, "not a certificate").unwrap();
    assert!(router.reload_tls().is_err());
    trusting(&a.ca_cert)
        .connect(addr, session("still-a"))
        .await
        .unwrap();
    std::fs::copy(&b.server_cert, &cert).unwrap();
    std::fs::copy(&b.server_key, &key).unwrap();
    assert!(router.reload_tls().unwrap());
    trusting(&b.ca_cert)
        .connect(addr, session("after"))
        .await
        .expect("new connections get the new certificate");
    assert!(trusting(&a.ca_cert)
        .connect(addr, session("a"))
        .await
        .is_err());
    before
        .publish(
            "s",
            Class::Command,
            Bytes::from_static(b"still here"),
            PublishOptions::default(),
        )
        .await
        .expect("a connection made before the reload carries on");
    router.shutdown().await;
}
