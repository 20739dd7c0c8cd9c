use super::*;

fn agent(name: &str) -> Arc<str> {
    Arc::from(name)
}

#[test]
fn leases_are_capped_router_wide_and_per_holder() {
    let limits = LeaseLimits {
        max_leases: 3,
        max_held_per_agent: 2,
    };
    let mut leases = Leases::restore([], 0, 1_000, limits);
    let (a, b) = (agent("a"), agent("b"));
    leases.acquire("s", "one", &a, 100, 0).unwrap();
    leases.acquire("s", "two", &a, 100, 0).unwrap();
    assert!(matches!(
        leases.acquire("s", "three", &a, 100, 0),
        Err(LeaseRefusal::Limit(_))
    ));
    leases.acquire("s", "three", &b, 100, 0).unwrap();
    // A fourth lease is past the router's cap, even for a holder with room.
    assert!(matches!(
        leases.acquire("s", "four", &b, 100, 0),
        Err(LeaseRefusal::Limit(_))
    ));
    // A release gives the holder's place back; known leases stay known.
    leases.release("s", "one", &a, 1).unwrap();
    // b's holding of "three" ran out: a takes it over (and b's place is given back).
    leases.acquire("s", "three", &a, 100, 200).unwrap();
    assert_eq!(leases.counts(), (3, 2));
    // An expired holding ("two") is swept: its holder's place comes back.
    assert_eq!(leases.sweep(250), 1);
    assert_eq!(leases.counts(), (3, 1));
    leases.acquire("s", "one", &a, 100, 250).unwrap();
    leases.acquire("s", "two", &b, 100, 250).unwrap();
    assert!(matches!(
        leases.acquire("s", "four", &b, 100, 250),
        Err(LeaseRefusal::Limit(_))
    ));
}

#[test]
fn many_leases_restore_each_under_its_key() {
    let mut restored = Restored::default();
    for n in 0..20_000u64 {
        let name = format!("lease-{n}");
        let (key, payload) = lease_record("s", &name, n + 1, "a", 1_000);
        restored.apply(&key, &payload);
        // An older record of the same lease, logged later, loses.
        let (key, payload) = lease_record("s", &name, n, "", 0);
        restored.apply(&key, &payload);
    }
    let leases = Leases::restore(restored.leases, 0, 1_000, LeaseLimits::default());
    assert_eq!(leases.counts(), (20_000, 20_000));
    assert_eq!(leases.newest("s", "lease-19999"), 20_000);
}

#[test]
fn one_holder_at_a_time_and_tokens_only_grow() {
    let mut leases = Leases::default();
    let (a, b) = (agent("a"), agent("b"));
    let first = leases.acquire("s", "leader", &a, 1_000, 0).unwrap();
    assert_eq!((first.grant.token, first.new_token), (1, true));
    assert_eq!(
        (first.grant.granted_at_ms, first.grant.expires_at_ms),
        (0, 1_000)
    );
    // Held: b is refused with the time left.
    assert_eq!(
        leases.acquire("s", "leader", &b, 1_000, 400),
        Err(LeaseRefusal::Held {
            holder: "a".into(),
            remaining_ms: 600
        })
    );
    // Renewal keeps the token and moves the expiry.
    let renewed = leases.renew("s", "leader", &a, 1, 1_000, 900).unwrap();
    assert_eq!(
        (renewed.grant.token, renewed.grant.expires_at_ms),
        (1, 1_900)
    );
    assert!(!renewed.new_token);
    // a stops renewing (paused): at expiry b gets the lease with a newer token...
    let second = leases.acquire("s", "leader", &b, 1_000, 1_900).unwrap();
    assert_eq!((second.grant.token, second.new_token), (2, true));
    // ...and a's late renewal is refused: it lost the lease.
    assert_eq!(
        leases.renew("s", "leader", &a, 1, 1_000, 2_000),
        Err(LeaseRefusal::Lost { newest_token: 2 })
    );
    assert_eq!(leases.newest("s", "leader"), 2);
    // Leases of other names and swarms are independent.
    assert_eq!(
        leases
            .acquire("s", "scheduler", &a, 1_000, 2_000)
            .unwrap()
            .grant
            .token,
        1
    );
    assert_eq!(
        leases
            .acquire("t", "leader", &a, 1_000, 2_000)
            .unwrap()
            .grant
            .token,
        1
    );
}

#[test]
fn release_frees_the_lease_and_restore_keeps_tokens_growing() {
    let mut leases = Leases::default();
    let (a, b) = (agent("a"), agent("b"));
    leases.acquire("s", "leader", &a, 10_000, 0).unwrap();
    assert!(leases.release("s", "leader", &b, 1).is_err(), "not b's");
    leases.release("s", "leader", &a, 1).unwrap();
    assert_eq!(
        leases
            .acquire("s", "leader", &b, 10_000, 5)
            .unwrap()
            .grant
            .token,
        2
    );
    // After a restart, tokens continue from the newest logged one.
    let mut restored = Restored::default();
    let (key, payload) = lease_record("s/with/slashes", "leader", 2, "", 0);
    restored.apply(&key, &payload);
    let (key, payload) = lease_record("s/with/slashes", "leader", 7, "", 0);
    restored.apply(&key, &payload);
    let mut leases = Leases::restore(restored.leases, 0, 600_000, LeaseLimits::default());
    assert_eq!(
        leases
            .acquire("s/with/slashes", "leader", &a, 1_000, 0)
            .unwrap()
            .grant
            .token,
        8
    );
}

/// Lease names and swarms may hold `/`: every lease restores under its own key, so a
/// lease named `a/b` continues its tokens after a restart and two leases never collide.
#[test]
fn lease_tokens_restore_under_their_own_names() {
    let a = agent("a");
    let mut restored = Restored::default();
    for (swarm, name, token) in [
        ("s", "a/b", 5),
        ("s/a", "b", 9),
        ("a/b", "c", 3),
        ("a", "b/c", 4),
    ] {
        let (key, payload) = lease_record(swarm, name, token, "", 0);
        restored.apply(&key, &payload);
    }
    let (pause, stop, drain) = (pause_key("p/q"), stop_key("x/y"), drain_key("n/1"));
    restored.apply(&pause, b"1");
    restored.apply(&stop, &7u64.to_be_bytes());
    restored.apply(&drain, b"1");
    assert_eq!(restored.paused, ["p/q"]);
    assert_eq!(restored.stops, [("x/y".to_owned(), 7)]);
    assert_eq!(restored.drained, ["n/1"]);
    let mut leases = Leases::restore(restored.leases, 0, 600_000, LeaseLimits::default());
    for (swarm, name, next) in [
        ("s", "a/b", 6),
        ("s/a", "b", 10),
        ("a/b", "c", 4),
        ("a", "b/c", 5),
    ] {
        let token = leases
            .acquire(swarm, name, &a, 1_000, 0)
            .unwrap()
            .grant
            .token;
        assert_eq!(token, next, "{swarm} {name}");
    }
}

/// Keys of the earlier `lease/<swarm>/<name>` form are still read; an ambiguous one
/// gives its token to every reading, so the real lease never goes backwards.
#[test]
fn legacy_control_keys_are_still_read() {
    let a = agent("a");
    let mut restored = Restored::default();
    restored.apply("lease/s/a/b", &5u64.to_be_bytes());
    restored.apply("pause/p", b"1");
    restored.apply("stop/x", &7u64.to_be_bytes());
    restored.apply("drain/n", b"1");
    assert_eq!(restored.paused, ["p"]);
    assert_eq!(restored.stops, [("x".to_owned(), 7)]);
    assert_eq!(restored.drained, ["n"]);
    // Its record has no TTL: nobody is granted it for the longest TTL there is.
    let mut leases = Leases::restore(restored.leases, 0, 1_000, LeaseLimits::default());
    for (swarm, name) in [("s", "a/b"), ("s/a", "b")] {
        assert!(leases.acquire(swarm, name, &a, 1_000, 999).is_err());
        let token = leases
            .acquire(swarm, name, &a, 1_000, 1_000)
            .unwrap()
            .grant
            .token;
        assert_eq!(token, 6, "{swarm} {name}");
    }
}

/// A longer renewal whose record could not be logged leaves the holding as it was: the
/// holder keeps it until its old expiry, and the longer TTL must still be logged.
#[test]
fn a_longer_renewal_that_was_not_logged_leaves_the_holding_as_it_was() {
    let a = agent("a");
    let mut leases = Leases::default();
    leases.acquire("s", "leader", &a, 1_000, 0).unwrap();
    leases.logged("s", "leader", 1, 1_000);
    let longer = leases.renew("s", "leader", &a, 1, 60_000, 500).unwrap();
    assert!(longer.must_log);
    // A second renewal while the first one's record is on its way must log too.
    let second = leases.renew("s", "leader", &a, 1, 60_000, 501).unwrap();
    assert!(second.must_log);
    // The first one's record failed: its undo leaves the later extension alone.
    let extended_to = longer.grant.expires_at_ms;
    leases.undo_extension("s", "leader", 1, longer.previous.unwrap(), extended_to);
    assert_eq!(leases.check_stamp("s", "leader", "a", 1, 60_000), Ok(()));
    // The second one's failed too, and nothing moved the expiry since: back to the old.
    let extended_to = second.grant.expires_at_ms;
    leases.undo_extension("s", "leader", 1, second.previous.unwrap(), extended_to);
    // (The second's previous expiry is the first's extension, which its own undo
    // left: the holding ends when the first extension would have.)
    assert_eq!(leases.check_stamp("s", "leader", "a", 1, 60_000), Ok(()));
    assert!(leases.check_stamp("s", "leader", "a", 1, 60_500).is_err());
    // Undone when nothing moved it since: back to the expiry before it.
    let again = leases.renew("s", "leader", &a, 1, 90_000, 600).unwrap();
    assert!(again.must_log);
    leases.undo_extension(
        "s",
        "leader",
        1,
        again.previous.unwrap(),
        again.grant.expires_at_ms,
    );
    assert!(leases.check_stamp("s", "leader", "a", 1, 60_500).is_err());
}

/// A lease held when the router stopped is held again after the restart by the same
/// holder for its logged TTL: nobody else gets it while the old holding may still run,
/// the holder may renew it with its token, and a release restores as free.
#[test]
fn a_lease_held_at_a_restart_stays_its_holders_for_its_ttl() {
    let (a, b) = (agent("a"), agent("b"));
    let mut leases = Leases::default();
    let granted = leases.acquire("s", "leader", &a, 1_000, 0).unwrap();
    assert!(granted.must_log);
    leases.logged("s", "leader", 1, 1_000);
    // A longer TTL on renewal is logged too; a shorter one is not.
    assert!(
        leases
            .renew("s", "leader", &a, 1, 5_000, 10)
            .unwrap()
            .must_log
    );
    leases.logged("s", "leader", 1, 5_000);
    assert!(
        !leases
            .renew("s", "leader", &a, 1, 2_000, 20)
            .unwrap()
            .must_log
    );
    let mut restored = Restored::default();
    for (token, holder, ttl) in [(1, "a", 1_000), (1, "a", 5_000)] {
        let (key, payload) = lease_record("s", "leader", token, holder, ttl);
        restored.apply(&key, &payload);
    }
    let (key, payload) = lease_record("s", "free", 4, "", 0);
    restored.apply(&key, &payload);
    // The router restarts at router time 100.
    let mut leases = Leases::restore(restored.leases, 100, 600_000, LeaseLimits::default());
    assert_eq!(
        leases.acquire("s", "leader", &b, 1_000, 5_099),
        Err(LeaseRefusal::Held {
            holder: "a".into(),
            remaining_ms: 1
        })
    );
    assert_eq!(leases.check_stamp("s", "leader", "a", 1, 5_099), Ok(()));
    let renewed = leases.renew("s", "leader", &a, 1, 1_000, 5_000).unwrap();
    assert_eq!(renewed.grant.token, 1);
    assert_eq!(
        leases
            .acquire("s", "free", &b, 1_000, 100)
            .unwrap()
            .grant
            .token,
        5
    );
}

/// A stamped publish passes only from the current holder, with the newest token, before
/// expiry: an expired holder is refused at once, before anyone else acquires.
#[test]
fn stamps_pass_only_from_the_holder_before_expiry() {
    let (a, b) = (agent("a"), agent("b"));
    let mut leases = Leases::default();
    leases.acquire("s", "leader", &a, 1_000, 0).unwrap();
    assert_eq!(leases.check_stamp("s", "leader", "a", 1, 999), Ok(()));
    assert_eq!(
        leases.check_stamp("s", "leader", "a", 1, 1_000),
        Err(StampRefusal::NotHeld { newest_token: 1 })
    );
    assert_eq!(
        leases.check_stamp("s", "leader", "b", 1, 10),
        Err(StampRefusal::NotHeld { newest_token: 1 })
    );
    assert_eq!(
        leases.check_stamp("s", "leader", "a", 0, 10),
        Err(StampRefusal::Stale { newest_token: 1 })
    );
    leases.acquire("s", "leader", &b, 1_000, 1_000).unwrap();
    assert_eq!(
        leases.check_stamp("s", "leader", "a", 1, 1_001),
        Err(StampRefusal::Stale { newest_token: 2 })
    );
    leases.release("s", "leader", &b, 2).unwrap();
    assert_eq!(
        leases.check_stamp("s", "leader", "b", 2, 1_002),
        Err(StampRefusal::NotHeld { newest_token: 2 })
    );
}

#[test]
fn presence_newest_wins_and_timeouts_expire_members() {
    // The handle is the connection id itself.
    let outbox = ConnId;
    let present = |conn, at| Present {
        conn: ConnId(conn),
        role: Role::Agent,
        swarms: vec!["s".into()],
        metadata: format!("conn {conn}"),
        last_seen: Arc::new(AtomicU64::new(at)),
        outbox: outbox(conn),
    };
    let mut presence = Presence::default();
    assert!(matches!(
        presence.join(agent("a"), present(1, 0)),
        Joined::New
    ));
    assert!(matches!(
        presence.join(agent("b"), present(2, 0)),
        Joined::New
    ));
    // a reconnects: the old connection is replaced, no duplicate member.
    let Joined::Replaced(old) = presence.join(agent("a"), present(3, 10)) else {
        panic!("not replaced")
    };
    assert_eq!(old.conn, ConnId(1));
    assert_eq!(presence.list("s", usize::MAX).len(), 2);
    // The old connection closing does not remove the new one.
    assert!(presence.leave("a", ConnId(1)).is_none());
    assert_eq!(presence.list("s", usize::MAX)[0].metadata, "conn 3");
    // Heartbeats keep a member; silence past the timeout expires it.
    presence.seen("a", ConnId(3), 2_000);
    presence.seen("b", ConnId(99), 2_000); // another connection's: ignored
    let gone = presence.expire(3_100, 3_000);
    assert_eq!(gone.len(), 1);
    assert_eq!(&*gone[0].0, "b");
    assert_eq!(presence.leave("a", ConnId(3)).unwrap().conn, ConnId(3));
    assert!(presence.is_empty());
    assert!(presence.by_swarm.is_empty());
}

#[test]
fn a_swarm_lists_its_own_members_in_order_within_the_budget() {
    let present = |conn: u64, swarms: &[&str]| Present {
        conn: ConnId(conn),
        role: Role::Agent,
        swarms: swarms.iter().map(|s| s.to_string()).collect(),
        metadata: String::new(),
        last_seen: Arc::new(AtomicU64::new(0)),
        outbox: ConnId(conn),
    };
    let mut presence = Presence::default();
    presence.join(agent("c"), present(1, &["s", "t"]));
    presence.join(agent("a"), present(2, &["s"]));
    presence.join(agent("b"), present(3, &["t"]));
    let names = |p: &Presence<ConnId>, swarm, budget| -> Vec<String> {
        p.list(swarm, budget).into_iter().map(|m| m.agent).collect()
    };
    assert_eq!(names(&presence, "s", usize::MAX), ["a", "c"]);
    assert_eq!(names(&presence, "t", usize::MAX), ["b", "c"]);
    // 33 bytes per member of these: the budget cuts the list, in order.
    assert_eq!(names(&presence, "t", 40), ["b"]);
    // c reconnects in "s" only: it leaves "t"'s list.
    presence.join(agent("c"), present(4, &["s"]));
    assert_eq!(names(&presence, "t", usize::MAX), ["b"]);
    presence.leave("b", ConnId(3));
    assert!(names(&presence, "t", usize::MAX).is_empty());
    assert!(!presence.by_swarm.contains_key("t"));
}

#[test]
fn stops_are_capped_and_expired_ones_make_room() {
    let mut stops = Stops::default();
    for n in 0..MAX_STOPS {
        stops.stop(&format!("agent-{n}"), 10);
    }
    assert!(!stops.has_room_for("one-more", 5));
    assert!(
        stops.has_room_for("agent-7", 5),
        "a stopped agent may be stopped again"
    );
    assert!(stops.has_room_for("one-more", 10), "all expired: dropped");
    assert!(stops.until.is_empty());
}

#[test]
fn stops_expire() {
    let mut stops = Stops::default();
    stops.stop("a", 1_000);
    assert_eq!(
        stops.refused_for("a", 400),
        Some(Duration::from_millis(600))
    );
    assert_eq!(stops.refused_for("a", 1_000), None);
    assert_eq!(stops.refused_for("b", 0), None);
}

#[test]
fn pause_and_stop_records_parse_back() {
    assert_eq!(
        parse_safety(&pause_key("s/1"), b"1"),
        Some(SafetyRecord::Pause {
            swarm: "s/1".into(),
            paused: true
        })
    );
    assert_eq!(
        parse_safety(&pause_key("s"), b"0"),
        Some(SafetyRecord::Pause {
            swarm: "s".into(),
            paused: false
        })
    );
    assert_eq!(
        parse_safety(&stop_key("a"), &42u64.to_be_bytes()),
        Some(SafetyRecord::Stop {
            agent: "a".into(),
            until_ms: 42
        })
    );
    assert_eq!(parse_safety(&stop_key("a"), b"short"), None);
    assert_eq!(parse_safety(&drain_key("n"), b"1"), None);
}
