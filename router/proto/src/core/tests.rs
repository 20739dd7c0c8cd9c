use super::*;
use bytes::Bytes;

const PUBLISHER: u64 = 1000;

fn publish(swarm: &str, class: Class, target: Option<&str>, payload: &'static [u8]) -> Publish {
    Publish {
        request_id: 1,
        swarm: swarm.into(),
        class,
        target_agent: target.map(Into::into),
        key: None,
        payload: Bytes::from_static(payload),
        fencing_token: 0,
        lease: None,
    }
}

/// Everything the core asked for, with appends made durable at once (as a log would).
#[derive(Default)]
struct Drained {
    deliveries: Vec<(u64, Class, OutFrame)>,
    replies: Vec<(u64, Message)>,
    appends: Vec<(Arc<str>, OpId)>,
    created: Vec<(Arc<str>, Epoch)>,
}

fn drain(core: &mut Core<u64>) -> Drained {
    let mut out = Drained::default();
    loop {
        let mut durable: Vec<(Arc<str>, OpId)> = Vec::new();
        while let Some(action) = core.poll_action() {
            match action {
                Action::Deliver {
                    to, class, frame, ..
                } => out.deliveries.push((to, class, frame)),
                Action::Reply { to, message } => out.replies.push((to, message)),
                Action::CreateLog { swarm, epoch } => out.created.push((swarm, epoch)),
                Action::Append { swarm, op, .. } => {
                    out.appends.push((swarm.clone(), op));
                    durable.push((swarm, op));
                }
                Action::ReadDelta(_) => {}
            }
        }
        if durable.is_empty() {
            return out;
        }
        for (swarm, op) in durable {
            core.handle_durable(&swarm, op, Instant::now());
        }
    }
}

fn agent(name: &str) -> Arc<str> {
    name.into()
}

fn now() -> Now {
    Now {
        instant: Instant::now(),
        unix_ms: 1_700_000_000_000,
        wall_us: 1_700_000_000_000_000,
    }
}

#[test]
fn a_paused_swarm_holds_commands_and_resume_releases_them_in_order() {
    let mut core: Core<u64> = Core::new(16);
    let now = now();
    core.handle_subscribe(ConnId(1), &agent("a"), 1, "s", Class::Command, None, None)
        .unwrap();
    core.handle_subscribe(ConnId(1), &agent("a"), 1, "s", Class::Control, None, None)
        .unwrap();
    core.handle_pause("s", true).unwrap();
    assert!(core.is_paused("s"));
    for payload in [&b"c1"[..], b"c2"] {
        core.handle_publish(
            "ctl",
            PUBLISHER,
            &publish("s", Class::Command, None, payload),
            now,
        )
        .unwrap();
    }
    core.handle_publish(
        "ctl",
        PUBLISHER,
        &publish("s", Class::Control, None, b"k"),
        now,
    )
    .unwrap();
    let drained = drain(&mut core);
    // Publishers are acknowledged, control goes through, commands are held.
    let acks = drained
        .replies
        .iter()
        .filter(|(to, m)| *to == PUBLISHER && matches!(m, Message::PublishAck { .. }))
        .count();
    assert_eq!(acks, 3);
    let delivered: Vec<Class> = drained.deliveries.iter().map(|(_, c, _)| *c).collect();
    assert_eq!(delivered, vec![Class::Control]);
    assert!(core.catching_up().is_empty(), "held while paused");
    core.handle_pause("s", false).unwrap();
    let catch_up = core.catching_up();
    assert_eq!(catch_up.len(), 1);
    assert_eq!(
        (catch_up[0].class, catch_up[0].from),
        (Class::Command, OpId(1))
    );
}

#[test]
fn op_ids_are_gap_free_per_swarm_and_only_for_ordered_classes() {
    let mut core = Core::<u64>::new(10);
    let mut op = |swarm: &str, class| {
        core.handle_publish("c", PUBLISHER, &publish(swarm, class, None, b"x"), now())
            .unwrap()
            .op_id
    };
    assert_eq!(op("a", Class::Command), OpId(1));
    assert_eq!(op("a", Class::Control), OpId(2));
    assert_eq!(op("b", Class::Command), OpId(1));
    assert_eq!(op("a", Class::Telemetry), OpId::NONE);
    assert_eq!(op("a", Class::Command), OpId(3));
    assert_eq!(core.next_op("a"), OpId(4));
    let drained = drain(&mut core);
    assert_eq!(drained.created.len(), 2);
    assert_ne!(
        drained.created[0].1, drained.created[1].1,
        "each swarm gets its own epoch"
    );
    assert_eq!(drained.appends.len(), 4);
}

#[test]
fn ordered_ops_are_acknowledged_and_delivered_only_once_durable() {
    let mut core = Core::<u64>::new(10);
    core.handle_subscribe(ConnId(1), &agent("a1"), 1, "s", Class::Command, None, None)
        .unwrap();
    for _ in 0..3 {
        core.handle_publish(
            "ctl",
            PUBLISHER,
            &publish("s", Class::Command, None, b"x"),
            now(),
        )
        .unwrap();
    }
    let mut appends = Vec::new();
    while let Some(action) = core.poll_action() {
        match action {
            Action::Append { op, record, .. } => {
                let (parsed, _) = crate::record::parse_record(&record.to_bytes()).unwrap();
                assert_eq!(parsed.op, op);
                appends.push(op);
            }
            Action::CreateLog { .. } => {}
            other => panic!("nothing but appends before durability: {other:?}"),
        }
    }
    assert_eq!(appends, vec![OpId(1), OpId(2), OpId(3)]);
    // Durable up to 2: two acks and two deliveries, in order; op 3 still waits.
    core.handle_durable("s", OpId(2), Instant::now());
    let mut order = Vec::new();
    while let Some(action) = core.poll_action() {
        match action {
            Action::Reply {
                to,
                message: Message::PublishAck { op_id, .. },
            } => {
                assert_eq!(to, PUBLISHER);
                order.push(("ack", op_id.0));
            }
            Action::Deliver { to, .. } => {
                assert_eq!(to, 1);
                order.push(("deliver", 0));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        order,
        vec![("ack", 1), ("deliver", 0), ("ack", 2), ("deliver", 0)]
    );
    assert_eq!(core.durable_op("s"), OpId(2));
    core.handle_durable("s", OpId(3), Instant::now());
    assert_eq!(drain(&mut core).deliveries.len(), 1);
}

#[test]
fn a_failed_log_makes_the_swarm_unavailable_and_refuses_pending_publishers() {
    let mut core = Core::<u64>::new(10);
    core.handle_publish(
        "ctl",
        PUBLISHER,
        &publish("s", Class::Command, None, b"x"),
        now(),
    )
    .unwrap();
    while core.poll_action().is_some() {}
    core.handle_log_failed("s", OpId(1), "disk full");
    let Some(Action::Reply {
        message: Message::Error(error),
        ..
    }) = core.poll_action()
    else {
        panic!("pending publisher not told");
    };
    assert_eq!(error.code, ErrorCode::SwarmUnavailable.as_u16());
    let err = core
        .handle_publish(
            "ctl",
            PUBLISHER,
            &publish("s", Class::Command, None, b"x"),
            now(),
        )
        .unwrap_err();
    assert!(matches!(err, CoreError::Unavailable { .. }));
    assert!(core
        .handle_subscribe(ConnId(1), &agent("a"), 1, "s", Class::Telemetry, None, None)
        .is_err());
    // Other swarms are served.
    core.handle_publish(
        "ctl",
        PUBLISHER,
        &publish("t", Class::Command, None, b"x"),
        now(),
    )
    .unwrap();
}

#[test]
fn restored_swarms_continue_their_sequence_in_their_epoch() {
    let mut core = Core::<u64>::new(10);
    core.restore_swarm("s", Epoch(42), OpId(17), None);
    let outcome = core
        .handle_publish(
            "ctl",
            PUBLISHER,
            &publish("s", Class::Command, None, b"x"),
            now(),
        )
        .unwrap();
    assert_eq!(outcome.op_id, OpId(18));
    assert_eq!(core.epoch("s"), Some(Epoch(42)));
    let drained = drain(&mut core);
    assert!(
        drained.created.is_empty(),
        "a restored swarm's log exists already"
    );
    core.restore_swarm("bad", Epoch(1), OpId(3), Some("damaged".into()));
    assert!(core
        .handle_publish(
            "ctl",
            PUBLISHER,
            &publish("bad", Class::Command, None, b"x"),
            now()
        )
        .is_err());
}

/// The routes a driver would hold after applying every change so far.
fn telemetry_routes(
    core: &mut Core<u64>,
    routes: &mut HashMap<Arc<str>, TelemetryRoute<u64>>,
) -> usize {
    let changes = core.take_telemetry_changes();
    let count = changes.len();
    for (name, route) in changes {
        match route {
            Some(route) => routes.insert(name, route),
            None => routes.remove(&name),
        };
    }
    count
}

fn recipients(route: &TelemetryRoute<u64>, source: &str, target: Option<&str>) -> Vec<u64> {
    let mut to: Vec<u64> = route.recipients(source, target).copied().collect();
    to.sort_unstable();
    to
}

#[test]
fn telemetry_routes_follow_subscriptions_disconnects_and_failures() {
    let mut core = Core::<u64>::new(10);
    let mut routes = HashMap::new();
    let sub = |core: &mut Core<u64>, conn: u64, name: &str, class, filter| {
        core.handle_subscribe(ConnId(conn), &agent(name), conn, "s", class, filter, None)
            .unwrap()
    };
    assert!(sub(&mut core, 1, "a1", Class::Telemetry, None));
    assert!(sub(&mut core, 2, "a2", Class::Telemetry, Some("a1")));
    // Command subscriptions are no telemetry route's business.
    sub(&mut core, 3, "a3", Class::Command, None);
    assert_eq!(telemetry_routes(&mut core, &mut routes), 1);
    let route = &routes["s"];
    assert!(route.unavailable.is_none());
    assert_eq!(recipients(route, "a1", None), vec![1, 2]);
    assert_eq!(recipients(route, "a9", None), vec![1]);
    assert_eq!(recipients(route, "a1", Some("a2")), vec![2]);
    assert!(!route.wanted("a9", Some("a2")));
    // Nothing changed, nothing to take.
    sub(&mut core, 1, "a1", Class::Telemetry, None);
    assert_eq!(telemetry_routes(&mut core, &mut routes), 0);

    assert!(core.handle_unsubscribe(ConnId(2), "s", Class::Telemetry, Some("a1")));
    telemetry_routes(&mut core, &mut routes);
    assert_eq!(recipients(&routes["s"], "a1", None), vec![1]);
    core.handle_disconnect(ConnId(3));
    assert_eq!(telemetry_routes(&mut core, &mut routes), 0);
    core.handle_disconnect(ConnId(1));
    telemetry_routes(&mut core, &mut routes);
    assert!(!routes.contains_key("s"), "no subscriber, no route");

    // An unavailable swarm keeps a route that refuses, subscribers or not.
    sub(&mut core, 4, "a4", Class::Telemetry, None);
    core.handle_log_failed("s", OpId(1), "disk gone");
    telemetry_routes(&mut core, &mut routes);
    assert!(routes["s"]
        .unavailable
        .as_deref()
        .unwrap()
        .contains("disk gone"));
    core.handle_disconnect(ConnId(4));
    telemetry_routes(&mut core, &mut routes);
    assert!(routes["s"].unavailable.is_some());
    core.restore_swarm("bad", Epoch(1), OpId(3), Some("damaged".into()));
    telemetry_routes(&mut core, &mut routes);
    assert_eq!(routes["bad"].unavailable.as_deref(), Some("damaged"));
}

#[test]
fn targeted_and_filtered_delivery() {
    let mut core = Core::<u64>::new(10);
    core.handle_subscribe(ConnId(1), &agent("a1"), 1, "s", Class::Command, None, None)
        .unwrap();
    core.handle_subscribe(ConnId(2), &agent("a2"), 2, "s", Class::Command, None, None)
        .unwrap();
    core.handle_subscribe(
        ConnId(3),
        &agent("ctl"),
        3,
        "s",
        Class::Telemetry,
        Some("a1"),
        None,
    )
    .unwrap();
    core.handle_publish(
        "ctl",
        PUBLISHER,
        &publish("s", Class::Command, Some("a2"), b"x"),
        now(),
    )
    .unwrap();
    let out = drain(&mut core);
    assert_eq!(
        out.deliveries.iter().map(|d| d.0).collect::<Vec<_>>(),
        vec![2]
    );
    core.handle_publish(
        "a2",
        PUBLISHER,
        &publish("s", Class::Telemetry, None, b"t"),
        now(),
    )
    .unwrap();
    assert!(
        drain(&mut core).deliveries.is_empty(),
        "filter on a1 must drop a2's telemetry"
    );
    core.handle_publish(
        "a1",
        PUBLISHER,
        &publish("s", Class::Telemetry, None, b"t"),
        now(),
    )
    .unwrap();
    assert_eq!(drain(&mut core).deliveries.len(), 1);
}

#[test]
fn overlapping_subscriptions_deliver_once_and_unsubscribe_is_exact() {
    let mut core = Core::<u64>::new(10);
    let a = agent("a");
    assert!(core
        .handle_subscribe(ConnId(1), &a, 1, "s", Class::Alert, Some("x"), None)
        .unwrap());
    assert!(core
        .handle_subscribe(ConnId(1), &a, 1, "s", Class::Alert, None, None)
        .unwrap());
    assert!(!core
        .handle_subscribe(ConnId(1), &a, 1, "s", Class::Alert, None, None)
        .unwrap());
    let send = |core: &mut Core<u64>, from: &str| {
        core.handle_publish(
            from,
            PUBLISHER,
            &publish("s", Class::Alert, None, b"!"),
            now(),
        )
        .unwrap();
        drain(core).deliveries.len()
    };
    assert_eq!(send(&mut core, "x"), 1);
    assert!(core.handle_unsubscribe(ConnId(1), "s", Class::Alert, None));
    assert_eq!(send(&mut core, "y"), 0);
    assert_eq!(send(&mut core, "x"), 1);
    assert!(core.handle_unsubscribe(ConnId(1), "s", Class::Alert, Some("x")));
    assert_eq!(core.subscriber_count("s", Class::Alert), 0);
    assert!(!core.handle_unsubscribe(ConnId(1), "s", Class::Alert, Some("x")));
}

#[test]
fn fan_out_shares_one_head_and_the_payload_buffer() {
    let mut core = Core::<u64>::new(10);
    for i in 0..5 {
        core.handle_subscribe(ConnId(i), &agent("a"), i, "s", Class::Telemetry, None, None)
            .unwrap();
    }
    let p = publish("s", Class::Telemetry, None, &[9u8; 4096]);
    let outcome = core.handle_publish("ctl", PUBLISHER, &p, now()).unwrap();
    assert_eq!(outcome.recipients, 5);
    let out = drain(&mut core).deliveries;
    for (_, _, frame) in &out {
        assert_eq!(frame.body.as_ptr(), p.payload.as_ptr());
        assert_eq!(frame.head.as_ptr(), out[0].2.head.as_ptr());
    }
}

#[test]
fn disconnect_removes_subscriptions_but_keeps_the_sequencer() {
    let mut core = Core::<u64>::new(10);
    core.handle_subscribe(ConnId(1), &agent("a"), 1, "s", Class::Command, None, None)
        .unwrap();
    core.handle_publish(
        "c",
        PUBLISHER,
        &publish("s", Class::Command, None, b"1"),
        now(),
    )
    .unwrap();
    drain(&mut core);
    core.handle_ack(ConnId(1), "s", Class::Command, OpId(1), Instant::now());
    core.handle_ack(ConnId(1), "s", Class::Command, OpId(99), Instant::now()); // beyond what is durable: ignored
    assert_eq!(core.acked(ConnId(1), "s"), OpId(1));
    // An ack from a connection that never subscribed is freed on disconnect too.
    core.handle_ack(ConnId(2), "s", Class::Command, OpId(1), Instant::now());
    assert_eq!(core.acked(ConnId(2), "s"), OpId(1));
    core.handle_disconnect(ConnId(2));
    assert_eq!(core.acked(ConnId(2), "s"), OpId(0));
    assert!(!core.conn_swarms.contains_key(&ConnId(2)));
    core.handle_disconnect(ConnId(1));
    assert_eq!(core.subscriber_count("s", Class::Command), 0);
    assert!(core.conn_swarms.is_empty());
    assert_eq!(core.acked(ConnId(1), "s"), OpId(0));
    let next = core
        .handle_publish(
            "c",
            PUBLISHER,
            &publish("s", Class::Command, None, b"2"),
            now(),
        )
        .unwrap();
    assert_eq!(next.op_id, OpId(2));
}

#[test]
fn swarm_cap_refuses_new_swarms_only() {
    let mut core = Core::<u64>::new(1);
    let send = |core: &mut Core<u64>, swarm: &str, class| {
        core.handle_publish("c", PUBLISHER, &publish(swarm, class, None, b""), now())
    };
    send(&mut core, "one", Class::Command).unwrap();
    assert_eq!(
        send(&mut core, "two", Class::Command),
        Err(CoreError::TooManySwarms { max: 1 })
    );
    assert!(core
        .handle_subscribe(ConnId(1), &agent("a"), 1, "two", Class::Command, None, None)
        .is_err());
    send(&mut core, "one", Class::Command).unwrap();
    // Telemetry to an unknown swarm creates nothing and is not an error.
    assert_eq!(
        send(&mut core, "three", Class::Telemetry)
            .unwrap()
            .recipients,
        0
    );
    assert_eq!(core.swarm_count(), 1);
}

#[test]
fn the_swarm_cap_is_shared_by_shards_and_idle_swarms_are_freed() {
    let swarms = SwarmBudget::new(3, 2);
    let config = CoreConfig {
        swarms: swarms.clone(),
        ..CoreConfig::default()
    };
    let (mut one, mut two) = (
        Core::<u64>::with_config(config.clone()),
        Core::<u64>::with_config(config),
    );
    let subscribe = |core: &mut Core<u64>, conn: u64, who: &str, swarm: &str| {
        core.handle_subscribe(
            ConnId(conn),
            &agent(who),
            conn,
            swarm,
            Class::Telemetry,
            None,
            None,
        )
    };
    subscribe(&mut one, 1, "a", "s1").unwrap();
    subscribe(&mut one, 1, "a", "s2").unwrap();
    // The agent's quota is full: in either shard.
    assert_eq!(
        subscribe(&mut two, 1, "a", "s3"),
        Err(CoreError::AgentSwarmQuota { max: 2 })
    );
    // An ordered publish gives s3 a log: it stays in memory.
    two.handle_publish(
        "b",
        PUBLISHER,
        &publish("s3", Class::Command, None, b"x"),
        now(),
    )
    .unwrap();
    drain(&mut two);
    // The router-wide cap counts both shards.
    assert_eq!(
        subscribe(&mut two, 2, "b", "s4"),
        Err(CoreError::TooManySwarms { max: 3 })
    );
    // Subscribed swarms, and swarms with a log, are not freed.
    assert_eq!(one.collect_idle() + two.collect_idle(), 0);
    one.handle_disconnect(ConnId(1));
    assert_eq!(one.collect_idle(), 2);
    assert_eq!(
        (one.swarm_count(), two.swarm_count(), swarms.held()),
        (0, 1, 1)
    );
    assert_eq!(two.collect_idle(), 0);
    // Room again, and the agent's quota was given back.
    subscribe(&mut two, 1, "a", "s1").unwrap();
    subscribe(&mut one, 1, "a", "s2").unwrap();
    assert_eq!(swarms.held(), 3);
}

#[test]
fn a_left_ordered_subscription_frees_its_swarm_and_its_tracking() {
    let mut core = Core::<u64>::new(10);
    for name in ["o", "p"] {
        core.handle_subscribe(ConnId(5), &agent("c"), 5, name, Class::Command, None, None)
            .unwrap();
    }
    core.handle_ack(ConnId(5), "o", Class::Command, OpId(0), Instant::now());
    assert!(core.handle_unsubscribe(ConnId(5), "o", Class::Command, None));
    // "o" is no longer the connection's; "p" still is.
    assert_eq!(core.conn_swarms[&ConnId(5)].len(), 1);
    assert_eq!(core.collect_idle(), 1);
    assert_eq!(core.swarm_count(), 1);
    assert!(core.handle_unsubscribe(ConnId(5), "p", Class::Command, None));
    assert!(!core.conn_swarms.contains_key(&ConnId(5)));
    assert_eq!(core.collect_idle(), 1);
}

#[test]
fn redelivery_rewinds_to_the_last_ack_never_before_the_subscription() {
    let mut core = Core::<u64>::with_config(CoreConfig {
        redelivery_timeout: Duration::from_secs(1),
        ..CoreConfig::default()
    });
    let send = |core: &mut Core<u64>| {
        core.handle_publish(
            "c",
            PUBLISHER,
            &publish("s", Class::Command, None, b"x"),
            now(),
        )
        .unwrap();
        drain(core)
    };
    for _ in 0..5 {
        send(&mut core);
    }
    core.handle_subscribe(ConnId(1), &agent("a"), 1, "s", Class::Command, None, None)
        .unwrap();
    assert_eq!(send(&mut core).deliveries.len(), 1); // op 6
    let start = Instant::now();
    assert_eq!(core.handle_tick(start), 0, "not overdue yet");
    assert_eq!(core.handle_tick(start + Duration::from_secs(2)), 1);
    let catch_up = core.catching_up();
    assert_eq!(catch_up.len(), 1);
    // Ops 1..=5 were durable before it subscribed: only op 6 is sent again.
    assert_eq!((catch_up[0].from, catch_up[0].to), (OpId(6), OpId(6)));
    // Acknowledged: no more redelivery.
    core.handle_replayed(ConnId(1), "s", Class::Command, OpId(6), &[], OpId(6), start);
    core.handle_ack(ConnId(1), "s", Class::Command, OpId(6), start);
    assert_eq!(core.handle_tick(start + Duration::from_secs(10)), 0);
}

#[test]
fn a_resume_point_catches_up_then_goes_live_without_gap_or_repeat() {
    let mut core = Core::<u64>::new(10);
    for _ in 0..10 {
        core.handle_publish(
            "c",
            PUBLISHER,
            &publish("s", Class::Command, None, b"x"),
            now(),
        )
        .unwrap();
    }
    drain(&mut core);
    let epoch = core.epoch("s").unwrap();
    core.handle_subscribe(
        ConnId(1),
        &agent("a"),
        1,
        "s",
        Class::Command,
        None,
        Some((epoch, OpId(4))),
    )
    .unwrap();
    let catch_up = core.catching_up();
    assert_eq!((catch_up[0].from, catch_up[0].to), (OpId(5), OpId(10)));
    // A live op while catching up is not sent live: it will be read from the log.
    core.handle_publish(
        "c",
        PUBLISHER,
        &publish("s", Class::Command, None, b"x"),
        now(),
    )
    .unwrap();
    assert!(drain(&mut core).deliveries.is_empty());
    let replayed: Vec<ReplayedOp> = (5..=10)
        .map(|op| ReplayedOp {
            op: OpId(op),
            class: Class::Command,
            source: "c".into(),
            target: None,
            frame: Bytes::from(vec![op as u8]),
        })
        .collect();
    // A read planned from another cursor (it finished late) is dropped.
    core.handle_replayed(
        ConnId(1),
        "s",
        Class::Command,
        OpId(4),
        &replayed,
        OpId(10),
        Instant::now(),
    );
    assert!(drain(&mut core).deliveries.is_empty());
    core.handle_replayed(
        ConnId(1),
        "s",
        Class::Command,
        OpId(5),
        &replayed,
        OpId(10),
        Instant::now(),
    );
    assert_eq!(drain(&mut core).deliveries.len(), 6);
    // Op 11 became durable meanwhile: one more step, then live.
    let catch_up = core.catching_up();
    assert_eq!((catch_up[0].from, catch_up[0].to), (OpId(11), OpId(11)));
    core.handle_replayed(
        ConnId(1),
        "s",
        Class::Command,
        OpId(11),
        &[],
        OpId(11),
        Instant::now(),
    );
    assert!(core.catching_up().is_empty());
    core.handle_publish(
        "c",
        PUBLISHER,
        &publish("s", Class::Command, None, b"x"),
        now(),
    )
    .unwrap();
    assert_eq!(drain(&mut core).deliveries.len(), 1);
}

#[test]
fn ack_lag_measures_publish_to_the_ack_of_the_newest_op_acknowledged() {
    let mut core: Core<u64> = Core::new(16);
    core.handle_subscribe(ConnId(1), &agent("a"), 1, "s", Class::Command, None, None)
        .unwrap();
    let published = now();
    for _ in 0..3 {
        core.handle_publish(
            "c",
            PUBLISHER,
            &publish("s", Class::Command, None, b"x"),
            published,
        )
        .unwrap();
    }
    assert_eq!(drain(&mut core).deliveries.len(), 3);
    let command = Class::Command.index();
    assert_eq!(core.ack_lag()[command].len(), 0, "nothing acknowledged yet");
    let later = published.instant + Duration::from_millis(40);
    // One cumulative ack of ops 1..=2 counts once; an ack that does not move is not a sample.
    core.handle_ack(ConnId(1), "s", Class::Command, OpId(2), later);
    core.handle_ack(ConnId(1), "s", Class::Command, OpId(2), later);
    core.handle_ack(ConnId(1), "s", Class::Command, OpId(1), later);
    assert_eq!(core.ack_lag()[command].len(), 1);
    let lag_us = core.ack_lag()[command].max();
    assert!((39_000..=41_000).contains(&lag_us), "{lag_us} us");
    core.handle_ack(ConnId(1), "s", Class::Command, OpId(3), later);
    assert_eq!(core.ack_lag()[command].len(), 2);
    assert_eq!(core.ack_lag_unmeasured(), 0);
    assert_eq!(core.ack_lag()[Class::Control.index()].len(), 0);
}

#[test]
fn ack_lag_keeps_a_bounded_window_of_receive_times() {
    let mut core: Core<u64> = Core::new(16);
    core.handle_subscribe(ConnId(1), &agent("a"), 1, "s", Class::Command, None, None)
        .unwrap();
    let published = now();
    for _ in 0..ACK_LAG_WINDOW + 10 {
        core.handle_publish(
            "c",
            PUBLISHER,
            &publish("s", Class::Command, None, b"x"),
            published,
        )
        .unwrap();
        drain(&mut core);
    }
    assert_eq!(core.received.at.len(), ACK_LAG_WINDOW);
    assert_eq!(core.received.order.len(), ACK_LAG_WINDOW);
    // Op 1 left the window: its ack moves the subscriber but is not measured.
    core.handle_ack(ConnId(1), "s", Class::Command, OpId(1), published.instant);
    assert_eq!(core.ack_lag()[Class::Command.index()].len(), 0);
    assert_eq!(core.ack_lag_unmeasured(), 1, "counted as not measured");
    core.handle_ack(ConnId(1), "s", Class::Command, OpId(20), published.instant);
    assert_eq!(core.ack_lag()[Class::Command.index()].len(), 1);
}

/// The actions queued so far, without making appends durable (a shared log answers
/// through `handle_followed` and `handle_conflict`).
fn actions(core: &mut Core<u64>) -> Vec<Action<u64>> {
    std::iter::from_fn(|| core.poll_action()).collect()
}

fn refusal_code(action: &Action<u64>) -> Option<u16> {
    match action {
        Action::Reply {
            message: Message::Error(error),
            ..
        } => Some(error.code),
        _ => None,
    }
}

#[test]
fn a_shared_logs_ops_are_delivered_in_its_order_and_an_op_id_taken_elsewhere_is_refused() {
    let mut core: Core<u64> = Core::new(16);
    let now = now();
    assert!(!core.has_log("s"));
    core.adopt_log("s", Epoch(7), OpId(10));
    assert!(core.has_log("s"));
    assert_eq!(core.next_op("s"), OpId(11));
    core.handle_subscribe(ConnId(1), &agent("a"), 1, "s", Class::Command, None, None)
        .unwrap();
    let remote = |op: u64| ReplayedOp {
        op: OpId(op),
        class: Class::Command,
        source: "ctl-b".into(),
        target: None,
        frame: Bytes::from(format!("frame-{op}")),
    };
    let delivered = |actions: &[Action<u64>]| -> Vec<(u64, Bytes)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Deliver { to, frame, op, .. } => {
                    assert_eq!(*to, 1);
                    Some((op.0, frame.head.clone()))
                }
                _ => None,
            })
            .collect()
    };

    // Another router's op: delivered here, and the sequencer continues after it.
    let op = remote(11);
    assert_eq!(
        core.handle_followed("s", Epoch(7), OpId(11), false, Some(&op), now.instant),
        Some(false)
    );
    assert_eq!(delivered(&actions(&mut core)), [(11, op.frame.clone())]);
    assert_eq!(
        (core.durable_op("s"), core.next_op("s")),
        (OpId(11), OpId(12))
    );

    // This router's op comes back from the log: acknowledged and delivered.
    let outcome = core
        .handle_publish(
            "ctl",
            PUBLISHER,
            &publish("s", Class::Command, None, b"c12"),
            now,
        )
        .unwrap();
    assert_eq!(outcome.op_id, OpId(12));
    actions(&mut core);
    let own = ReplayedOp {
        source: "ctl".into(),
        ..remote(12)
    };
    assert_eq!(
        core.handle_followed("s", Epoch(7), OpId(12), true, Some(&own), now.instant),
        Some(false)
    );
    let done = actions(&mut core);
    assert!(done.iter().any(|a| matches!(
        a,
        Action::Reply {
            to: PUBLISHER,
            message: Message::PublishAck {
                op_id: OpId(12),
                ..
            }
        }
    )));
    assert_eq!(
        delivered(&done).len(),
        1,
        "delivered once, from the publish"
    );

    // Known already, or of another epoch: ignored.
    assert_eq!(
        core.handle_followed(
            "s",
            Epoch(7),
            OpId(12),
            false,
            Some(&remote(12)),
            now.instant
        ),
        None
    );
    assert_eq!(
        core.handle_followed(
            "s",
            Epoch(8),
            OpId(13),
            false,
            Some(&remote(13)),
            now.instant
        ),
        None
    );

    // An op id given out here that another router took first: the publish is refused
    // with Conflict, the other router's op delivered.
    core.handle_publish(
        "ctl",
        PUBLISHER,
        &publish("s", Class::Command, None, b"c13"),
        now,
    )
    .unwrap();
    actions(&mut core);
    assert_eq!(
        core.handle_followed(
            "s",
            Epoch(7),
            OpId(13),
            false,
            Some(&remote(13)),
            now.instant
        ),
        Some(true)
    );
    let done = actions(&mut core);
    assert_eq!(
        done.iter().filter_map(refusal_code).collect::<Vec<_>>(),
        [ErrorCode::Conflict.as_u16()]
    );
    assert_eq!(delivered(&done), [(13, remote(13).frame)]);
    assert_eq!(core.next_op("s"), OpId(14));

    // The log's own report of a conflict refuses the same way, and op ids go back to the
    // first one not durable.
    for payload in [&b"c14"[..], b"c15"] {
        let p = Publish {
            payload: Bytes::from_static(payload),
            ..publish("s", Class::Command, None, b"")
        };
        core.handle_publish("ctl", PUBLISHER, &p, now).unwrap();
    }
    actions(&mut core);
    core.handle_conflict("s", OpId(14));
    assert_eq!(
        actions(&mut core).iter().filter_map(refusal_code).count(),
        2
    );
    assert_eq!(core.next_op("s"), OpId(14));

    // A gap (ops erased from the log): the subscriber reads what the log holds of them
    // before it goes on live.
    core.handle_followed(
        "s",
        Epoch(7),
        OpId(16),
        false,
        Some(&remote(16)),
        now.instant,
    );
    assert!(delivered(&actions(&mut core)).is_empty());
    let catching = core.catching_up();
    assert_eq!(catching.len(), 1);
    assert_eq!((catching[0].from, catching[0].to), (OpId(14), OpId(16)));

    // This router's void record (or a refused publish that landed late) takes its op id and
    // delivers nothing; another router's op behind ops given out here later refuses none.
    assert_eq!(
        core.handle_followed("s", Epoch(7), OpId(17), true, None, now.instant),
        Some(false)
    );
    assert_eq!(
        (core.durable_op("s"), core.next_op("s")),
        (OpId(17), OpId(18))
    );
    assert!(delivered(&actions(&mut core)).is_empty());
    core.handle_publish(
        "ctl",
        PUBLISHER,
        &publish("s", Class::Command, None, b"c18"),
        now,
    )
    .unwrap();
    actions(&mut core);
    core.handle_conflict("s", OpId(30));
    assert!(
        actions(&mut core).is_empty(),
        "nothing awaited at or after op 30"
    );
    let own = ReplayedOp {
        source: "ctl".into(),
        ..remote(18)
    };
    core.handle_followed("s", Epoch(7), OpId(18), true, Some(&own), now.instant);
    assert!(actions(&mut core).iter().any(|a| matches!(
        a,
        Action::Reply {
            message: Message::PublishAck {
                op_id: OpId(18),
                ..
            },
            ..
        }
    )));
}
