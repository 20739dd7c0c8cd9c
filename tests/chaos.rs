//! Through the fault proxy (`swarmbus-chaos`): commands over a lossy, duplicating,
//! reordering network arrive once each, in order, at every subscriber.

use std::time::Duration;

use bytes::Bytes;
use swarmbus_chaos::{FaultPlan, FaultProxy};
use swarmbus_client::{IdempotentApply, PublishOptions, Session};
use swarmbus_schema::{Class, OpId, Role};

use crate::common::start_router;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_through_loss_duplication_and_reordering_apply_once_in_order() {
    // Everything through the proxy: no bulk connection going to the router directly.
    let t = start_router(|c| c.bulk_listen = swarmbus_router::config::BulkListen::Off).await;
    let faults = FaultPlan {
        loss: 0.05,
        duplicate: 0.02,
        reorder: 0.05,
        reorder_by: Duration::from_millis(5),
        latency: Duration::from_micros(200),
        ..FaultPlan::default()
    };
    let proxy = FaultProxy::start(t.router.local_addr(), 17, faults.clone(), faults)
        .await
        .unwrap();
    let connect = |agent: &'static str, role| {
        let connector = t.connector.clone();
        let addr = proxy.addr();
        async move {
            connector
                .connect(addr, Session::new(agent, role, ["s"]))
                .await
                .unwrap_or_else(|e| panic!("{agent} connects through the proxy: {e}"))
        }
    };
    let (ctl, _c) = connect("ctl", Role::Controller).await;
    let mut agents = Vec::new();
    for name in ["a1", "a2", "a3"] {
        let (client, deliveries) = connect(name, Role::Agent).await;
        client.subscribe("s", Class::Command, None).await.unwrap();
        agents.push((client, deliveries));
    }
    const COMMANDS: u64 = 200;
    let mut acked = Vec::new();
    for i in 0..COMMANDS {
        let op = ctl
            .publish(
                "s",
                Class::Command,
                Bytes::from(i.to_le_bytes().to_vec()),
                PublishOptions::default(),
            )
            .await
            .expect("acknowledged through the faults");
        acked.push(op.0);
    }
    assert_eq!(acked, (1..=COMMANDS).collect::<Vec<_>>());
    for (client, mut deliveries) in agents {
        let mut apply = IdempotentApply::new();
        let mut applied = Vec::new();
        while applied.len() < COMMANDS as usize {
            let delivery = tokio::time::timeout(Duration::from_secs(20), deliveries.recv())
                .await
                .expect("every command arrives")
                .expect("the session stays open");
            apply.apply(&delivery, |d| applied.push((d.op_id.0, d.payload.clone())));
        }
        let ops: Vec<u64> = applied.iter().map(|(op, _)| *op).collect();
        assert_eq!(
            ops,
            (1..=COMMANDS).collect::<Vec<_>>(),
            "once each, in order"
        );
        for (op, payload) in &applied {
            assert_eq!(
                payload.as_ref(),
                (op - 1).to_le_bytes(),
                "op {op}'s payload"
            );
        }
        client
            .ack("s", Class::Command, OpId(COMMANDS))
            .await
            .unwrap();
    }
    let totals = proxy.totals();
    let count = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
    assert!(count(&totals.dropped) > 0, "the network lost datagrams");
    assert!(count(&totals.duplicated) > 0, "and sent some twice");
    assert!(count(&totals.reordered) > 0, "and held some back");
}
