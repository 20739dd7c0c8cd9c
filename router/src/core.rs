//! The sans-IO routing core: swarms, subscriptions and the per-swarm op sequencer.
//!
//! [`Core`] is a deterministic state machine in the manner of `quinn-proto`: it never reads
//! a clock or touches a socket. Call order:
//!
//! 1. feed inputs with `handle_subscribe`, `handle_unsubscribe`, `handle_publish`,
//!    `handle_ack` and `handle_disconnect`, passing the current time where it matters;
//! 2. drain the resulting work with [`Core::poll_action`] until it returns `None`.
//!
//! Each routing shard owns one `Core` for the swarms hashed to it, so nothing here is
//! shared between threads and no lock is taken. The core is generic over the subscriber
//! handle `H` (the router passes its per-connection outbox; tests pass plain ids) and hands
//! that handle back in [`Action::Deliver`].
//!
//! Fan-out encodes the Deliver header once per published message and shares it, and the
//! publisher's payload buffer, with every recipient: a delivery costs two reference-count
//! increments, whatever the payload size.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use swarmbus_schema::{encode_deliver_head, Class, OpId, OutFrame, Publish};
use thiserror::Error;

/// Router-wide connection id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Refusals of the core. All are recoverable: the request is refused, the session goes on.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CoreError {
    #[error("the router holds its maximum of {max} swarms")]
    TooManySwarms { max: usize },
}

/// Work for the driver.
#[derive(Debug)]
pub enum Action<H> {
    /// Queue `frame` for the subscriber behind `to` on the stream of `class`.
    Deliver {
        to: H,
        class: Class,
        frame: OutFrame,
    },
}

/// What a publish did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublishOutcome {
    /// The op id given by the swarm's sequencer; [`OpId::NONE`] for unordered classes.
    pub op_id: OpId,
    /// Subscriptions the message was queued for.
    pub recipients: usize,
}

#[derive(Debug)]
struct Subscriber<H> {
    conn: ConnId,
    /// The subscribing session's agent id, matched against a publish's target.
    agent: Arc<str>,
    /// Subscribed without an agent filter: every source matches.
    all_sources: bool,
    /// Source agents subscribed to by filter (when `all_sources` is false).
    sources: Vec<Box<str>>,
    handle: H,
}

impl<H> Subscriber<H> {
    fn wants(&self, source: &str, target: Option<&str>) -> bool {
        if let Some(target) = target {
            if *self.agent != *target {
                return false;
            }
        }
        self.all_sources || self.sources.iter().any(|s| **s == *source)
    }
}

#[derive(Debug)]
struct Swarm<H> {
    /// Next op id to give out; ids start at 1 and never repeat or skip.
    next_op: u64,
    /// Subscribers per class, indexed by [`Class::index`]; one entry per connection.
    subscribers: [Vec<Subscriber<H>>; Class::COUNT],
    /// Highest op id each connection acknowledged (cumulative).
    acked: HashMap<ConnId, OpId>,
    last_publish: Option<Instant>,
}

impl<H> Swarm<H> {
    fn new() -> Self {
        Swarm {
            next_op: 1,
            subscribers: Default::default(),
            acked: HashMap::new(),
            last_publish: None,
        }
    }
}

/// Routing state of one shard. See the module docs for the call order.
#[derive(Debug)]
pub struct Core<H> {
    swarms: HashMap<Box<str>, Swarm<H>>,
    /// Swarms each connection subscribes in, for cleanup on disconnect.
    conn_swarms: HashMap<ConnId, Vec<Box<str>>>,
    max_swarms: usize,
    actions: VecDeque<Action<H>>,
}

/// The swarm named `name`, created when missing and the cap allows.
fn swarm_entry<'a, H>(
    swarms: &'a mut HashMap<Box<str>, Swarm<H>>,
    max_swarms: usize,
    name: &str,
) -> Result<&'a mut Swarm<H>, CoreError> {
    if !swarms.contains_key(name) {
        if swarms.len() >= max_swarms {
            return Err(CoreError::TooManySwarms { max: max_swarms });
        }
        swarms.insert(name.into(), Swarm::new());
    }
    Ok(swarms
        .get_mut(name)
        .expect("present: inserted above when missing"))
}

impl<H: Clone> Core<H> {
    pub fn new(max_swarms: usize) -> Self {
        Core {
            swarms: HashMap::new(),
            conn_swarms: HashMap::new(),
            max_swarms,
            actions: VecDeque::new(),
        }
    }

    /// Adds a subscription. Subscribing twice is harmless; a connection holding several
    /// subscriptions that match one message receives it once. Returns whether it was new.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_subscribe(
        &mut self,
        conn: ConnId,
        agent: &Arc<str>,
        handle: H,
        swarm_name: &str,
        class: Class,
        agent_filter: Option<&str>,
    ) -> Result<bool, CoreError> {
        let swarm = swarm_entry(&mut self.swarms, self.max_swarms, swarm_name)?;
        let list = &mut swarm.subscribers[class.index()];
        let added = match list.iter_mut().find(|s| s.conn == conn) {
            Some(existing) => match agent_filter {
                None => !std::mem::replace(&mut existing.all_sources, true),
                Some(source) if existing.sources.iter().any(|s| **s == *source) => false,
                Some(source) => {
                    existing.sources.push(source.into());
                    true
                }
            },
            None => {
                list.push(Subscriber {
                    conn,
                    agent: agent.clone(),
                    all_sources: agent_filter.is_none(),
                    sources: agent_filter.map(|s| vec![s.into()]).unwrap_or_default(),
                    handle,
                });
                true
            }
        };
        self.track(conn, swarm_name);
        Ok(added)
    }

    /// Remembers that `conn` holds state in `swarm_name`, so disconnect frees it.
    fn track(&mut self, conn: ConnId, swarm_name: &str) {
        let swarms = self.conn_swarms.entry(conn).or_default();
        if !swarms.iter().any(|s| **s == *swarm_name) {
            swarms.push(swarm_name.into());
        }
    }

    /// Removes a subscription; returns whether it existed.
    pub fn handle_unsubscribe(
        &mut self,
        conn: ConnId,
        swarm_name: &str,
        class: Class,
        agent_filter: Option<&str>,
    ) -> bool {
        let Some(swarm) = self.swarms.get_mut(swarm_name) else {
            return false;
        };
        let list = &mut swarm.subscribers[class.index()];
        let Some(at) = list.iter().position(|s| s.conn == conn) else {
            return false;
        };
        let entry = &mut list[at];
        let removed = match agent_filter {
            None => std::mem::replace(&mut entry.all_sources, false),
            Some(source) => {
                let before = entry.sources.len();
                entry.sources.retain(|s| **s != *source);
                entry.sources.len() != before
            }
        };
        if !entry.all_sources && entry.sources.is_empty() {
            list.swap_remove(at);
        }
        removed
    }

    /// Routes a published message from `source_agent`. Ordered classes get the swarm's next
    /// op id. `payload` is shared, not copied, with every recipient.
    pub fn handle_publish(
        &mut self,
        source_agent: &str,
        publish: &Publish,
        now: Instant,
    ) -> Result<PublishOutcome, CoreError> {
        let class = publish.class;
        let swarm = if class.is_ordered() {
            swarm_entry(&mut self.swarms, self.max_swarms, &publish.swarm)?
        } else {
            match self.swarms.get_mut(publish.swarm.as_str()) {
                Some(swarm) => swarm,
                // Unordered messages to a swarm nobody subscribes in go nowhere; creating
                // the swarm for them would only cost memory.
                None => {
                    return Ok(PublishOutcome {
                        op_id: OpId::NONE,
                        recipients: 0,
                    })
                }
            }
        };
        let op_id = if class.is_ordered() {
            let op = OpId(swarm.next_op);
            swarm.next_op += 1;
            op
        } else {
            OpId::NONE
        };
        swarm.last_publish = Some(now);
        let target = publish.target_agent.as_deref();
        let mut recipients = 0;
        let mut head: Option<Bytes> = None;
        for subscriber in &swarm.subscribers[class.index()] {
            if !subscriber.wants(source_agent, target) {
                continue;
            }
            let head = head.get_or_insert_with(|| {
                encode_deliver_head(
                    &publish.swarm,
                    class,
                    op_id,
                    source_agent,
                    target,
                    publish.key.as_deref(),
                    publish.payload.len(),
                )
            });
            self.actions.push_back(Action::Deliver {
                to: subscriber.handle.clone(),
                class,
                frame: OutFrame {
                    head: head.clone(),
                    body: publish.payload.clone(),
                },
            });
            recipients += 1;
        }
        Ok(PublishOutcome { op_id, recipients })
    }

    /// Records a subscriber's cumulative acknowledgement (kept for redelivery, which the
    /// event log drives). Acks never move backwards.
    pub fn handle_ack(&mut self, conn: ConnId, swarm_name: &str, op_id: OpId) {
        let Some(swarm) = self.swarms.get_mut(swarm_name) else {
            return;
        };
        if op_id.is_none() || op_id.0 >= swarm.next_op {
            return;
        }
        let acked = swarm.acked.entry(conn).or_default();
        *acked = (*acked).max(op_id);
        self.track(conn, swarm_name);
    }

    /// Forgets every subscription and ack of a connection. Swarms stay: their sequencers
    /// must continue where they were.
    pub fn handle_disconnect(&mut self, conn: ConnId) {
        let Some(names) = self.conn_swarms.remove(&conn) else {
            return;
        };
        for name in names {
            if let Some(swarm) = self.swarms.get_mut(&*name) {
                for list in &mut swarm.subscribers {
                    list.retain(|s| s.conn != conn);
                }
                swarm.acked.remove(&conn);
            }
        }
    }

    /// The next piece of work for the driver.
    pub fn poll_action(&mut self) -> Option<Action<H>> {
        self.actions.pop_front()
    }

    /// The op id the next ordered message of `swarm` will get (1 for a new swarm).
    pub fn next_op(&self, swarm: &str) -> OpId {
        OpId(self.swarms.get(swarm).map_or(1, |s| s.next_op))
    }

    /// The highest op id `conn` acknowledged in `swarm`.
    pub fn acked(&self, conn: ConnId, swarm: &str) -> OpId {
        self.swarms
            .get(swarm)
            .and_then(|s| s.acked.get(&conn).copied())
            .unwrap_or_default()
    }

    pub fn swarm_count(&self) -> usize {
        self.swarms.len()
    }

    pub fn subscriber_count(&self, swarm: &str, class: Class) -> usize {
        self.swarms
            .get(swarm)
            .map_or(0, |s| s.subscribers[class.index()].len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(swarm: &str, class: Class, target: Option<&str>, payload: &'static [u8]) -> Publish {
        Publish {
            request_id: 1,
            swarm: swarm.into(),
            class,
            target_agent: target.map(Into::into),
            key: None,
            payload: Bytes::from_static(payload),
        }
    }

    fn drain(core: &mut Core<u64>) -> Vec<(u64, Class, OutFrame)> {
        let mut out = Vec::new();
        while let Some(Action::Deliver { to, class, frame }) = core.poll_action() {
            out.push((to, class, frame));
        }
        out
    }

    fn agent(name: &str) -> Arc<str> {
        name.into()
    }

    #[test]
    fn op_ids_are_gap_free_per_swarm_and_only_for_ordered_classes() {
        let mut core = Core::<u64>::new(10);
        let now = Instant::now();
        let p = |swarm, class| core_publish(swarm, class);
        fn core_publish(swarm: &'static str, class: Class) -> Publish {
            publish(swarm, class, None, b"x")
        }
        assert_eq!(
            core.handle_publish("c", &p("a", Class::Command), now)
                .unwrap()
                .op_id,
            OpId(1)
        );
        assert_eq!(
            core.handle_publish("c", &p("a", Class::Control), now)
                .unwrap()
                .op_id,
            OpId(2)
        );
        assert_eq!(
            core.handle_publish("c", &p("b", Class::Command), now)
                .unwrap()
                .op_id,
            OpId(1)
        );
        assert_eq!(
            core.handle_publish("c", &p("a", Class::Telemetry), now)
                .unwrap()
                .op_id,
            OpId::NONE
        );
        assert_eq!(
            core.handle_publish("c", &p("a", Class::Command), now)
                .unwrap()
                .op_id,
            OpId(3)
        );
        assert_eq!(core.next_op("a"), OpId(4));
    }

    #[test]
    fn targeted_and_filtered_delivery() {
        let mut core = Core::<u64>::new(10);
        let now = Instant::now();
        core.handle_subscribe(ConnId(1), &agent("a1"), 1, "s", Class::Command, None)
            .unwrap();
        core.handle_subscribe(ConnId(2), &agent("a2"), 2, "s", Class::Command, None)
            .unwrap();
        core.handle_subscribe(
            ConnId(3),
            &agent("ctl"),
            3,
            "s",
            Class::Telemetry,
            Some("a1"),
        )
        .unwrap();
        core.handle_publish("ctl", &publish("s", Class::Command, Some("a2"), b"x"), now)
            .unwrap();
        let out = drain(&mut core);
        assert_eq!(out.iter().map(|d| d.0).collect::<Vec<_>>(), vec![2]);
        core.handle_publish("a2", &publish("s", Class::Telemetry, None, b"t"), now)
            .unwrap();
        assert!(
            drain(&mut core).is_empty(),
            "filter on a1 must drop a2's telemetry"
        );
        core.handle_publish("a1", &publish("s", Class::Telemetry, None, b"t"), now)
            .unwrap();
        assert_eq!(drain(&mut core).len(), 1);
    }

    #[test]
    fn overlapping_subscriptions_deliver_once_and_unsubscribe_is_exact() {
        let mut core = Core::<u64>::new(10);
        let now = Instant::now();
        let a = agent("a");
        assert!(core
            .handle_subscribe(ConnId(1), &a, 1, "s", Class::Alert, Some("x"))
            .unwrap());
        assert!(core
            .handle_subscribe(ConnId(1), &a, 1, "s", Class::Alert, None)
            .unwrap());
        assert!(!core
            .handle_subscribe(ConnId(1), &a, 1, "s", Class::Alert, None)
            .unwrap());
        core.handle_publish("x", &publish("s", Class::Alert, None, b"!"), now)
            .unwrap();
        assert_eq!(drain(&mut core).len(), 1);
        assert!(core.handle_unsubscribe(ConnId(1), "s", Class::Alert, None));
        core.handle_publish("y", &publish("s", Class::Alert, None, b"!"), now)
            .unwrap();
        assert!(drain(&mut core).is_empty());
        core.handle_publish("x", &publish("s", Class::Alert, None, b"!"), now)
            .unwrap();
        assert_eq!(drain(&mut core).len(), 1);
        assert!(core.handle_unsubscribe(ConnId(1), "s", Class::Alert, Some("x")));
        assert_eq!(core.subscriber_count("s", Class::Alert), 0);
        assert!(!core.handle_unsubscribe(ConnId(1), "s", Class::Alert, Some("x")));
    }

    #[test]
    fn fan_out_shares_one_head_and_the_payload_buffer() {
        let mut core = Core::<u64>::new(10);
        for i in 0..5 {
            core.handle_subscribe(ConnId(i), &agent("a"), i, "s", Class::Telemetry, None)
                .unwrap();
        }
        let p = publish("s", Class::Telemetry, None, &[9u8; 4096]);
        let outcome = core.handle_publish("ctl", &p, Instant::now()).unwrap();
        assert_eq!(outcome.recipients, 5);
        let out = drain(&mut core);
        for (_, _, frame) in &out {
            assert_eq!(frame.body.as_ptr(), p.payload.as_ptr());
            assert_eq!(frame.head.as_ptr(), out[0].2.head.as_ptr());
        }
    }

    #[test]
    fn disconnect_removes_subscriptions_but_keeps_the_sequencer() {
        let mut core = Core::<u64>::new(10);
        let now = Instant::now();
        core.handle_subscribe(ConnId(1), &agent("a"), 1, "s", Class::Command, None)
            .unwrap();
        core.handle_publish("c", &publish("s", Class::Command, None, b"1"), now)
            .unwrap();
        core.handle_ack(ConnId(1), "s", OpId(1));
        core.handle_ack(ConnId(1), "s", OpId(99)); // beyond the sequencer: ignored
        assert_eq!(core.acked(ConnId(1), "s"), OpId(1));
        // An ack from a connection that never subscribed is freed on disconnect too.
        core.handle_ack(ConnId(2), "s", OpId(1));
        assert_eq!(core.acked(ConnId(2), "s"), OpId(1));
        core.handle_disconnect(ConnId(2));
        assert_eq!(core.acked(ConnId(2), "s"), OpId(0));
        assert!(!core.conn_swarms.contains_key(&ConnId(2)));
        core.handle_disconnect(ConnId(1));
        assert_eq!(core.subscriber_count("s", Class::Command), 0);
        assert!(core.conn_swarms.is_empty());
        assert_eq!(core.acked(ConnId(1), "s"), OpId(0));
        drain(&mut core);
        let next = core
            .handle_publish("c", &publish("s", Class::Command, None, b"2"), now)
            .unwrap();
        assert_eq!(next.op_id, OpId(2));
    }

    #[test]
    fn swarm_cap_refuses_new_swarms_only() {
        let mut core = Core::<u64>::new(1);
        let now = Instant::now();
        core.handle_publish("c", &publish("one", Class::Command, None, b""), now)
            .unwrap();
        assert_eq!(
            core.handle_publish("c", &publish("two", Class::Command, None, b""), now),
            Err(CoreError::TooManySwarms { max: 1 })
        );
        assert!(core
            .handle_subscribe(ConnId(1), &agent("a"), 1, "two", Class::Command, None)
            .is_err());
        core.handle_publish("c", &publish("one", Class::Command, None, b""), now)
            .unwrap();
        // Telemetry to an unknown swarm creates nothing and is not an error.
        assert_eq!(
            core.handle_publish("c", &publish("three", Class::Telemetry, None, b""), now)
                .unwrap()
                .recipients,
            0
        );
        assert_eq!(core.swarm_count(), 1);
    }
}
