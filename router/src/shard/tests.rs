use super::*;
use tokio::sync::oneshot;

/// A shard on an empty log in `dir`, with the plain file writer.
fn shard_in(dir: &std::path::Path) -> ShardSender {
    let (events_tx, events) = mpsc::unbounded_channel();
    let writer = crate::log::LogWriter::start(
        crate::log::WriterKind::File,
        crate::log::SyncPolicy::Always,
        64,
        vec![events_tx.clone()],
        None,
        crate::log::disk::Disk::real(),
    )
    .unwrap();
    let log = crate::log::ShardLog::new(
        0,
        dir,
        1 << 20,
        writer,
        Vec::new(),
        crate::log::Retention::default(),
        events_tx,
    );
    let config = CoreConfig {
        swarms: swarmbus_proto::quota::SwarmBudget::new(100, 100),
        epoch_seed: 7,
        redelivery_timeout: std::time::Duration::from_secs(5),
        delta_max_ops: 100,
    };
    let stats = Arc::new(Stats::default());
    let clock = crate::clock::Clock::new();
    let interval = std::time::Duration::from_secs(60);
    spawn_shard(16, config, interval, Box::new(log), events, stats, clock)
}

fn publish(
    swarm: &str,
    class: Class,
    key: &str,
) -> (RouterPublish, oneshot::Receiver<Result<OpId, String>>) {
    let (reply, answer) = oneshot::channel();
    let publish = RouterPublish {
        swarm: swarm.into(),
        class,
        key: key.into(),
        payload: bytes::Bytes::from_static(b"{}"),
        reply: Some(reply),
    };
    (publish, answer)
}

#[tokio::test]
async fn router_publishes_are_answered_with_their_op_ids_once_durable() {
    let dir = tempfile::tempdir().unwrap();
    let shard = shard_in(dir.path());
    let mut answers = Vec::new();
    for key in ["a", "b", "c"] {
        let (publish, answer) = publish("$control", Class::Control, key);
        shard
            .send(ShardCommand::RouterPublish(publish))
            .await
            .unwrap();
        answers.push(answer);
    }
    let mut ops = Vec::new();
    for answer in answers {
        ops.push(answer.await.unwrap().unwrap());
    }
    assert_eq!(ops, [OpId(1), OpId(2), OpId(3)]);
    // An alert (unordered) is answered at once, without an op id.
    let (alert, answer) = publish("fleet", Class::Alert, "breaker");
    shard
        .send(ShardCommand::RouterPublish(alert))
        .await
        .unwrap();
    assert_eq!(answer.await.unwrap(), Ok(OpId::NONE));
    // Nobody waits: no answer is kept.
    let (mut quiet, _) = publish("$control", Class::Control, "d");
    quiet.reply = None;
    shard
        .send(ShardCommand::RouterPublish(quiet))
        .await
        .unwrap();
    let (next, answer) = publish("$control", Class::Control, "e");
    shard.send(ShardCommand::RouterPublish(next)).await.unwrap();
    assert_eq!(answer.await.unwrap(), Ok(OpId(5)));
}

#[tokio::test]
async fn a_router_publish_whose_write_fails_is_answered_with_the_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let shard = shard_in(dir.path());
    // The swarm's first segment cannot be opened as a file: the writer's open fails (EISDIR)
    // as on a disk that refuses writes.
    let swarm_dir = dir
        .path()
        .join(crate::log::store::swarm_dir_name("$control"));
    std::fs::create_dir_all(swarm_dir.join(format!("{:020}.log", 1))).unwrap();
    let (first, answer) = publish("$control", Class::Control, "a");
    shard
        .send(ShardCommand::RouterPublish(first))
        .await
        .unwrap();
    let refused = tokio::time::timeout(std::time::Duration::from_secs(10), answer)
        .await
        .expect("answered")
        .unwrap()
        .unwrap_err();
    assert!(!refused.is_empty(), "the refusal says why");
    // The swarm is unavailable now: the next record is refused too, at once.
    let (next, answer) = publish("$control", Class::Control, "b");
    shard.send(ShardCommand::RouterPublish(next)).await.unwrap();
    assert!(answer.await.unwrap().is_err());
}

#[test]
fn shard_placement_is_stable_and_in_range() {
    for shards in 1..8 {
        for swarm in ["a", "b", "swarm-17", ""] {
            let s = shard_of(swarm, shards);
            assert!(s < shards);
            assert_eq!(s, shard_of(swarm, shards));
        }
    }
}
