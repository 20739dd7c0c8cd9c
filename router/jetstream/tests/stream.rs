//! The JetStream client against a real nats-server on 127.0.0.1.

use bytes::Bytes;
use swarmbus_jetstream::testing::NatsServer;
use swarmbus_jetstream::{Append, Cluster, Error, JetStreamConfig};

fn config(server: &NatsServer) -> JetStreamConfig {
    JetStreamConfig {
        urls: vec![server.url()],
        monitor_urls: vec![server.monitor_url()],
        ack_timeout_ms: 1_000,
        append_deadline_ms: 15_000,
        ..Default::default()
    }
}

fn record(op: u64) -> Append {
    Append {
        op,
        record: Bytes::from(format!("record of op {op}")),
        filler: false,
    }
}

async fn append(
    stream: &swarmbus_jetstream::SwarmStream,
    ops: std::ops::RangeInclusive<u64>,
) -> Result<Vec<u64>, Error> {
    let mut durable = Vec::new();
    stream
        .append_all(ops.map(record).collect(), |op| durable.push(op))
        .await?;
    Ok(durable)
}

#[tokio::test]
async fn appends_are_gap_free_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path(), true);
    let cluster = Cluster::connect(config(&server)).await.unwrap();
    let (stream, info) = cluster.open("alpha.swarm/1", 0xfeed).await.unwrap();
    assert_eq!((info.epoch, info.last_op), (0xfeed, 0));
    assert_eq!(
        append(&stream, 1..=300).await.unwrap(),
        (1..=300).collect::<Vec<_>>()
    );
    let read = stream.read(1, 300, 1_000, usize::MAX).await.unwrap();
    assert_eq!(read.len(), 300);
    for (i, (op, bytes)) in read.iter().enumerate() {
        assert_eq!(*op, i as u64 + 1);
        assert_eq!(*bytes, record(*op).record);
    }
    // Bounded reads stop at the count, the bytes and the last op asked for.
    assert_eq!(stream.read(10, 300, 5, usize::MAX).await.unwrap().len(), 5);
    assert_eq!(stream.read(10, 300, 100, 1).await.unwrap().len(), 1);
    let tail = stream.read(295, 297, 100, usize::MAX).await.unwrap();
    assert_eq!(
        tail.iter().map(|(op, _)| *op).collect::<Vec<_>>(),
        vec![295, 296, 297]
    );
    assert!(stream
        .read(301, 300, 100, usize::MAX)
        .await
        .unwrap()
        .is_empty());

    // Another connection sees the swarm with its epoch and last op; opening it again keeps
    // its epoch (not the one asked for).
    let again = Cluster::connect(config(&server)).await.unwrap();
    let swarms = again.swarms().await.unwrap();
    assert_eq!(swarms.len(), 1);
    assert_eq!(swarms[0].swarm, "alpha.swarm/1");
    assert_eq!(
        (swarms[0].epoch, swarms[0].last_op, swarms[0].first_op),
        (0xfeed, 300, 1)
    );
    let (stream, info) = again.open("alpha.swarm/1", 0xbeef).await.unwrap();
    assert_eq!((info.epoch, info.last_op), (0xfeed, 300));
    assert_eq!(append(&stream, 301..=302).await.unwrap(), vec![301, 302]);
}

#[tokio::test]
async fn a_repeated_append_is_not_doubled_and_a_taken_op_is_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path(), true);
    let cluster = Cluster::connect(config(&server)).await.unwrap();
    let (stream, _) = cluster.open("beta", 7).await.unwrap();
    append(&stream, 1..=3).await.unwrap();
    // Ops 2 and 3 again (as after an answer lost on the way): read back, found, durable.
    assert_eq!(append(&stream, 2..=3).await.unwrap(), vec![2, 3]);
    assert_eq!(stream.bounds().await.unwrap(), (1, 3));

    // Another writer's op 4 is there: this writer's op 4 is refused, not appended as 5.
    let other_router = Cluster::connect(config(&server)).await.unwrap();
    let (other, _) = other_router.open("beta", 7).await.unwrap();
    other
        .append_all(
            vec![Append {
                op: 4,
                record: Bytes::from_static(b"the other writer's op 4"),
                filler: false,
            }],
            |_| {},
        )
        .await
        .unwrap();
    match append(&stream, 4..=5).await {
        Err(Error::Conflict { op: 4, .. }) => {}
        other => panic!("expected a conflict at op 4, got {other:?}"),
    }
    assert_eq!(stream.bounds().await.unwrap(), (1, 4));
    // A filler is satisfied by whatever holds its op.
    let filler = Append {
        op: 4,
        record: Bytes::new(),
        filler: true,
    };
    stream.append_all(vec![filler], |_| {}).await.unwrap();
    assert_eq!(
        stream.get(4).await.unwrap().unwrap(),
        &b"the other writer's op 4"[..]
    );
    assert_eq!(stream.get(5).await.unwrap(), None);
}

#[tokio::test]
async fn appends_carry_on_across_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = NatsServer::start(dir.path(), true);
    let cluster = Cluster::connect(config(&server)).await.unwrap();
    let (stream, _) = cluster.open("gamma", 1).await.unwrap();
    append(&stream, 1..=50).await.unwrap();
    server.kill();
    let restart = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(500));
        server.restart();
        server
    });
    // Sent while the server is down: settled once it is back, within the deadline.
    assert_eq!(
        append(&stream, 51..=60).await.unwrap(),
        (51..=60).collect::<Vec<_>>()
    );
    let _server = restart.join().unwrap();
    assert_eq!(stream.bounds().await.unwrap(), (1, 60));
    let read = stream.read(1, 60, 100, usize::MAX).await.unwrap();
    assert_eq!(
        read.iter().map(|(op, _)| *op).collect::<Vec<_>>(),
        (1..=60).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_server_that_acknowledges_before_syncing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path(), false);
    match Cluster::connect(config(&server)).await {
        Err(Error::Unsynced { detail, .. }) => {
            assert!(detail.contains("sync_interval"), "{detail}")
        }
        other => panic!("expected the unsynced server refused, got {other:?}"),
    }
    let unverified = JetStreamConfig {
        monitor_urls: Vec::new(),
        ..config(&server)
    };
    match Cluster::connect(unverified.clone()).await {
        Err(Error::Config(detail)) => assert!(detail.contains("monitor_urls"), "{detail}"),
        other => panic!("expected a configuration error, got {other:?}"),
    }
    let danger = JetStreamConfig {
        danger_unsynced_acks: true,
        ..unverified
    };
    let cluster = Cluster::connect(danger).await.unwrap();
    let (stream, _) = cluster.open("delta", 1).await.unwrap();
    append(&stream, 1..=2).await.unwrap();
}

#[tokio::test]
async fn a_filler_erases_a_record_of_this_writer_that_landed_after_it_gave_up() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path(), true);
    let cluster = Cluster::connect(config(&server)).await.unwrap();
    let (stream, _) = cluster.open("epsilon", 3).await.unwrap();
    // Op 2 lands (as a publish would that the writer had given up on and refused).
    append(&stream, 1..=2).await.unwrap();
    let filler = Append {
        op: 2,
        record: Bytes::new(),
        filler: true,
    };
    stream
        .append_all(vec![filler.clone()], |_| {})
        .await
        .unwrap();
    assert_eq!(stream.get(2).await.unwrap(), None, "erased");
    // A read of nothing but erased ops answers at once, empty.
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read(2, 2, 10, usize::MAX),
    )
    .await
    .expect("a read of an erased tail answers");
    assert!(read.unwrap().is_empty());
    // Filled again (a retry after the erase): still void, nothing written.
    stream.append_all(vec![filler], |_| {}).await.unwrap();
    // The sequence goes on after the erased op, gap-free in numbering.
    assert_eq!(append(&stream, 3..=3).await.unwrap(), vec![3]);
    assert_eq!(stream.bounds().await.unwrap(), (1, 3));
    let read = stream.read(1, 3, 10, usize::MAX).await.unwrap();
    assert_eq!(
        read.iter().map(|(op, _)| *op).collect::<Vec<_>>(),
        vec![1, 3]
    );
}

#[tokio::test]
async fn the_router_signs_in_and_a_wrong_password_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start_with_user(dir.path(), "router", "s3cret");
    let signed_in = JetStreamConfig {
        user: Some("router".into()),
        password: Some("s3cret".into()),
        ..config(&server)
    };
    let cluster = Cluster::connect(signed_in.clone()).await.unwrap();
    let (stream, _) = cluster.open("zeta", 1).await.unwrap();
    append(&stream, 1..=1).await.unwrap();
    let wrong = JetStreamConfig {
        password: Some("guess".into()),
        connect_timeout_ms: 2_000,
        ..signed_in
    };
    match Cluster::connect(wrong).await {
        Err(Error::Connect { detail, .. }) => {
            assert!(detail.to_lowercase().contains("authori"), "{detail}")
        }
        other => panic!("expected the sign-in refused, got {other:?}"),
    }
    let anonymous = JetStreamConfig {
        connect_timeout_ms: 2_000,
        ..config(&server)
    };
    assert!(matches!(
        Cluster::connect(anonymous).await,
        Err(Error::Connect { .. })
    ));
}

/// Many swarms appending at once over one connection, each with its window of publishes
/// on the wire: none waits on another's (the client's acknowledgement cap is not shared).
#[tokio::test]
async fn many_swarms_append_at_once_over_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path(), false);
    let cluster = Cluster::connect(JetStreamConfig {
        danger_unsynced_acks: true,
        ..config(&server)
    })
    .await
    .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let (stream, _) = cluster.open(&format!("many-{i}"), 1).await.unwrap();
        tasks.spawn(async move { append(&stream, 1..=300).await.map(|d| d.len()) });
    }
    let all = tokio::time::timeout(std::time::Duration::from_secs(120), async {
        let mut done = 0;
        while let Some(joined) = tasks.join_next().await {
            assert_eq!(joined.unwrap().unwrap(), 300);
            done += 1;
        }
        done
    })
    .await
    .expect("every swarm's appends complete");
    assert_eq!(all, 40);
    // A name too long for a stream name in hex gets a hashed one, and is listed by name.
    let long = "a-long-swarm-name/".repeat(20);
    let (stream, _) = cluster.open(&long, 1).await.unwrap();
    assert!(stream.name().len() < 100, "{}", stream.name());
    append(&stream, 1..=2).await.unwrap();
    let listed = cluster.swarms().await.unwrap();
    assert_eq!(listed.len(), 41);
    assert!(listed.iter().any(|s| s.swarm == long && s.last_op == 2));
}

#[tokio::test]
async fn a_follower_reads_every_writers_ops_in_order_and_knows_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path(), true);
    let (a, b) = (
        Cluster::connect(config(&server)).await.unwrap(),
        Cluster::connect(config(&server)).await.unwrap(),
    );
    let (on_a, _) = a.open("followed", 0xabc).await.unwrap();
    let (on_b, info) = b.open("followed", 0xdef).await.unwrap();
    assert_eq!(
        info.epoch, 0xabc,
        "the second writer takes the stream's epoch"
    );
    append(&on_a, 1..=3).await.unwrap();
    // The follow starts before the other writer's ops and waits for them.
    let mut follower = on_a.follow(2).await.unwrap();
    append(&on_b, 4..=5).await.unwrap();
    append(&on_a, 6..=6).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), follower.next())
            .await
            .expect("the follower yields each op")
            .expect("the follow goes on")
            .unwrap();
        assert_eq!(next.record, record(next.op).record);
        seen.push((next.op, next.own));
    }
    assert_eq!(
        seen,
        [(2, true), (3, true), (4, false), (5, false), (6, true)]
    );
}
