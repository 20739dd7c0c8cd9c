//! One swarm's routing state: its subscribers per class, its sequencer and the ops waiting
//! to be durable.

use super::*;

impl<H> Swarm<H> {
    pub(super) fn new(name: &str, epoch: Epoch, last_op: OpId) -> Self {
        Swarm {
            name: name.into(),
            epoch,
            next_op: last_op.0 + 1,
            durable_op: last_op,
            unavailable: None,
            log_created: false,
            pending: VecDeque::new(),
            subscribers: Default::default(),
            acked: HashMap::new(),
            last_publish: None,
            paused: false,
            creator: None,
            shared: false,
            opening: false,
        }
    }

    pub(super) fn check_available(&self) -> Result<(), CoreError> {
        match &self.unavailable {
            Some(reason) => Err(CoreError::Unavailable {
                swarm: self.name.to_string(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Refuses the ops awaiting durability from `from` on with `code` (they will not be
    /// made durable).
    pub(super) fn refuse_pending(
        &mut self,
        from: OpId,
        code: ErrorCode,
        reason: &str,
        actions: &mut VecDeque<Action<H>>,
    ) {
        let first = self
            .pending
            .iter()
            .position(|p| p.op >= from)
            .unwrap_or(self.pending.len());
        for op in self.pending.drain(first..) {
            actions.push_back(Action::Reply {
                to: op.publisher,
                message: crate::refusal::Refusal::new(code, reason.to_owned())
                    .message(op.request_id),
            });
        }
    }

    /// Queues `frame` (of op `op`, `OpId::NONE` for unordered classes) for every live
    /// subscriber of `class` that wants it; returns how many.
    #[allow(clippy::too_many_arguments)] // the hot path: plain arguments, no bundling struct
    pub(super) fn fan_out(
        &mut self,
        class: Class,
        op: OpId,
        source: &str,
        target: Option<&str>,
        frame: &OutFrame,
        now: Instant,
        actions: &mut VecDeque<Action<H>>,
    ) -> usize
    where
        H: Clone,
    {
        let mut recipients = 0;
        let name = &self.name;
        let hold = self.paused && class == Class::Command;
        for subscriber in &mut self.subscribers[class.index()] {
            if hold {
                // Paused: the op waits in the log; the subscriber reads it from there, in
                // order, once the swarm is resumed.
                subscriber.cursor.get_or_insert(op);
                continue;
            }
            if subscriber.cursor.is_some() {
                // Catching up from the log: it will read this op there, in order.
                continue;
            }
            if subscriber.wants(source, target) {
                if !op.is_none() {
                    subscriber.delivered = op;
                    subscriber.unacked_since.get_or_insert(now);
                }
                actions.push_back(Action::Deliver {
                    to: subscriber.handle.clone(),
                    class,
                    frame: frame.clone(),
                    swarm: name.clone(),
                    op,
                    durable_at: (!op.is_none()).then_some(now),
                });
                recipients += 1;
            }
        }
        recipients
    }
}

/// splitmix64: the core's seeded source of new epochs (replayable from the seed).
pub(super) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl<H> Subscriber<H> {
    pub(super) fn wants(&self, source: &str, target: Option<&str>) -> bool {
        subscriber_wants(&self.agent, self.all_sources, &self.sources, source, target)
    }
}

/// Whether a subscriber (`agent`, subscribed to every source or to `sources`) wants a
/// message from `source` targeted at `target`.
pub(super) fn subscriber_wants(
    agent: &str,
    all_sources: bool,
    sources: &[Box<str>],
    source: &str,
    target: Option<&str>,
) -> bool {
    if targeted_elsewhere(target, agent) {
        return false;
    }
    all_sources || sources.iter().any(|s| **s == *source)
}

impl<H> TelemetryRoute<H> {
    /// The handles of the subscribers that want telemetry from `source` targeted at
    /// `target`, each once.
    pub fn recipients<'a>(
        &'a self,
        source: &'a str,
        target: Option<&'a str>,
    ) -> impl Iterator<Item = &'a H> + 'a {
        self.subscribers
            .iter()
            .filter(move |s| subscriber_wants(&s.agent, s.all_sources, &s.sources, source, target))
            .map(|s| &s.handle)
    }

    /// Whether anyone subscribes to the swarm's telemetry.
    pub fn has_subscribers(&self) -> bool {
        !self.subscribers.is_empty()
    }

    /// Whether any subscriber wants telemetry from `source` targeted at `target`.
    pub fn wanted(&self, source: &str, target: Option<&str>) -> bool {
        self.recipients(source, target).next().is_some()
    }
}
