//! Per-connection outbound queues: one bounded lane for session replies and one per class.
//!
//! Shards push frames; one writer task per lane drains its lane onto that lane's QUIC
//! stream, many frames per write (quinn's chunk API, so payload buffers are written by
//! reference). Lanes are separate so a telemetry stream stalled by flow control never holds
//! up a command: QUIC stream priorities then decide what goes on the wire first.
//!
//! Limits: every lane holds at most its configured number of frames, and the frames queued
//! hold at most `queues.connection_bytes` per connection and `queues.router_bytes` for the
//! whole router, of which telemetry may take at most half (the other half stays free for
//! what may not be shed). At a limit: telemetry drops its oldest frames (counted) and, with
//! none left to drop, the new one; control and command deliveries use
//! [`Outbox::try_push`], and a subscriber whose lane is full catches up from the event log
//! instead; any other lane marks the connection lagging and asks for it to be closed with
//! `Lagging` (it missed messages it may not lose, and must know it).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use swarmbus_schema::{ErrorCode, OutFrame};
use tokio::sync::Notify;

use crate::config::QueueConfig;
use crate::stats::Stats;
use swarmbus_proto::{ConnId, Handle, Lane};

/// The protocol's state machines address a connection through its outbox.
impl Handle for Outbox {
    fn conn(&self) -> ConnId {
        self.conn
    }
}

/// The queue was full and the lane may not shed: the connection is now lagging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lagging;

/// The lane is full (see [`Outbox::try_push`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// A queued frame, with the time it became deliverable when it is a live ordered delivery
/// (durable -> written to the stream is measured from it).
type Queued = (OutFrame, Option<Instant>);

#[derive(Debug)]
struct LaneQueue {
    frames: Mutex<VecDeque<Queued>>,
    ready: Notify,
    capacity: usize,
    shed: AtomicU64,
}

/// The outbound side of one connection, shared by the shards that deliver to it.
#[derive(Debug)]
pub struct Outbox {
    conn: ConnId,
    lanes: [LaneQueue; Lane::COUNT],
    closed: AtomicBool,
    close_code: AtomicU16,
    close_requested: Notify,
    stats: Arc<Stats>,
    /// Bytes queued in all lanes, and their limit.
    bytes: AtomicUsize,
    bytes_cap: usize,
    /// The whole router's limit on queued bytes (the count is `stats.queued_bytes`).
    router_bytes_cap: usize,
}

impl Outbox {
    pub fn new(conn: ConnId, queues: &QueueConfig, stats: Arc<Stats>) -> Self {
        let capacity = |lane: Lane| match lane {
            Lane::Session => queues.session,
            Lane::Class(class) => queues.for_class(class),
            Lane::Jobs | Lane::JobAnswers => queues.jobs,
        };
        let lane = |index: usize| {
            let lane = Lane::all().nth(index).unwrap_or(Lane::Session);
            LaneQueue {
                frames: Mutex::new(VecDeque::new()),
                ready: Notify::new(),
                capacity: capacity(lane),
                shed: AtomicU64::new(0),
            }
        };
        Outbox {
            conn,
            lanes: std::array::from_fn(lane),
            closed: AtomicBool::new(false),
            close_code: AtomicU16::new(0),
            close_requested: Notify::new(),
            stats,
            bytes: AtomicUsize::new(0),
            bytes_cap: queues.connection_bytes,
            router_bytes_cap: queues.router_bytes,
        }
    }

    pub fn conn(&self) -> ConnId {
        self.conn
    }

    fn lock(&self, lane: Lane) -> MutexGuard<'_, VecDeque<Queued>> {
        // A panic while holding this lock cannot leave the deque inconsistent (every
        // operation under it is a single push/pop), so a poisoned lock is still usable.
        self.lanes[lane.index()]
            .frames
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a frame. Frames for a closed connection are discarded. A full telemetry lane
    /// sheds its oldest frame; any other full lane marks the connection lagging and asks
    /// for it to be closed.
    pub fn push(&self, lane: Lane, frame: OutFrame) -> Result<(), Lagging> {
        if self.enqueue(lane, frame, lane.sheddable(), None).is_ok() {
            return Ok(());
        }
        self.stats
            .lagging_disconnects
            .fetch_add(1, Ordering::Relaxed);
        self.request_close(ErrorCode::Lagging);
        Err(Lagging)
    }

    /// Queues a frame unless the lane is full; never closes the connection. Used for ordered
    /// classes, whose subscribers catch up from the log instead of being disconnected.
    pub fn try_push(&self, lane: Lane, frame: OutFrame) -> Result<(), Full> {
        self.enqueue(lane, frame, false, None)
    }

    /// [`Outbox::try_push`] of a live ordered delivery, durable since `durable_at`: the
    /// lane's writer records the time until it wrote the frame to its stream.
    pub fn try_push_durable(
        &self,
        lane: Lane,
        frame: OutFrame,
        durable_at: Instant,
    ) -> Result<(), Full> {
        self.enqueue(lane, frame, false, Some(durable_at))
    }

    /// The one place frames enter a lane: at a limit (frames in the lane, bytes of the
    /// connection, bytes of the router), `shed` drops the oldest frames of the lane (and
    /// counts them) until the frame fits, or the frame itself when none are left; without
    /// `shed` the frame is refused.
    fn enqueue(
        &self,
        lane: Lane,
        frame: OutFrame,
        shed: bool,
        durable_at: Option<Instant>,
    ) -> Result<(), Full> {
        if self.closed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let len = frame.wire_len();
        let queue = &self.lanes[lane.index()];
        let mut frames = self.lock(lane);
        // Closed meanwhile: `close` empties the lanes under their locks, so after taking this
        // one the frame would never be drained (nor its bytes given back).
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        loop {
            if frames.len() < queue.capacity && self.reserve(len, lane.sheddable()) {
                break;
            }
            if !shed {
                return Err(Full);
            }
            queue.shed.fetch_add(1, Ordering::Relaxed);
            self.stats.telemetry_shed.fetch_add(1, Ordering::Relaxed);
            match frames.pop_front() {
                Some((oldest, _)) => self.release(oldest.wire_len()),
                // Nothing of this lane left to drop: the new frame is the one shed.
                None => return Ok(()),
            }
        }
        let was_empty = frames.is_empty();
        frames.push_back((frame, durable_at));
        drop(frames);
        if was_empty {
            queue.ready.notify_one();
        }
        Ok(())
    }

    /// Counts `len` more bytes against the connection's and the router's limits, or nothing
    /// when either would be passed. Telemetry (`half`) may only fill half of each.
    fn reserve(&self, len: usize, half: bool) -> bool {
        let (own_cap, router_cap) = if half {
            (self.bytes_cap / 2, self.router_bytes_cap / 2)
        } else {
            (self.bytes_cap, self.router_bytes_cap)
        };
        let own = self.bytes.fetch_add(len, Ordering::AcqRel) + len;
        if own > own_cap {
            self.bytes.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        let len64 = len as u64;
        let router = self.stats.queued_bytes.fetch_add(len64, Ordering::AcqRel) + len64;
        if router > router_cap as u64 {
            self.stats.queued_bytes.fetch_sub(len64, Ordering::AcqRel);
            self.bytes.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        // High-water marks: a plain load first, so the common case (below the mark) writes
        // nothing to these router-wide counters.
        for (mark, value) in [
            (&self.stats.connection_queued_bytes_max, own as u64),
            (&self.stats.queued_bytes_max, router),
        ] {
            if value > mark.load(Ordering::Relaxed) {
                mark.fetch_max(value, Ordering::Relaxed);
            }
        }
        true
    }

    fn release(&self, len: usize) {
        self.bytes.fetch_sub(len, Ordering::AcqRel);
        self.stats
            .queued_bytes
            .fetch_sub(len as u64, Ordering::AcqRel);
    }

    /// Bytes queued in all lanes of this connection.
    pub fn queued_bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    /// Moves up to `max_frames` frames (and about `max_bytes`) into `out`, in order,
    /// returning how many frames were taken; the durable times of those that carry one
    /// (see [`Outbox::try_push_durable`]) go to `durable_at`.
    pub fn drain(
        &self,
        lane: Lane,
        max_frames: usize,
        max_bytes: usize,
        out: &mut Vec<OutFrame>,
        durable_at: &mut Vec<Instant>,
    ) -> usize {
        let mut frames = self.lock(lane);
        let mut taken = 0;
        let mut bytes = 0;
        while taken < max_frames && bytes < max_bytes {
            let Some((frame, at)) = frames.pop_front() else {
                break;
            };
            durable_at.extend(at);
            bytes += frame.wire_len();
            self.release(frame.wire_len());
            out.push(frame);
            taken += 1;
        }
        taken
    }

    /// The frames of `lane` durable at `durable_at` were written to its stream just now:
    /// counted in the router's durable -> delivered lag.
    pub fn written(&self, lane: Lane, durable_at: &[Instant]) {
        if let Lane::Class(class) = lane {
            self.stats
                .delivery_lag
                .record(self.conn.0, class, durable_at, Instant::now());
        }
    }

    /// Waits until `lane` may have frames (or the outbox closed).
    pub async fn ready(&self, lane: Lane) {
        self.lanes[lane.index()].ready.notified().await
    }

    /// Frames the lane holds at most.
    pub fn capacity(&self, lane: Lane) -> usize {
        self.lanes[lane.index()].capacity
    }

    pub fn queued(&self, lane: Lane) -> usize {
        self.lock(lane).len()
    }

    /// Frames this lane dropped because it was full (telemetry only).
    pub fn shed(&self, lane: Lane) -> u64 {
        self.lanes[lane.index()].shed.load(Ordering::Relaxed)
    }

    /// Asks the connection's driver to close the connection with `code`; the first request
    /// wins. Writers stop and queued frames are dropped.
    pub fn request_close(&self, code: ErrorCode) {
        let _ =
            self.close_code
                .compare_exchange(0, code.as_u16(), Ordering::AcqRel, Ordering::Acquire);
        self.close();
        self.close_requested.notify_one();
    }

    /// Marks the outbox closed and wakes every writer so they exit.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        for lane in Lane::all() {
            let mut frames = self.lock(lane);
            for (frame, _) in frames.drain(..) {
                self.release(frame.wire_len());
            }
            drop(frames);
            self.lanes[lane.index()].ready.notify_one();
        }
    }

    /// Gives back the bytes of frames still queued (an outbox dropped without `close`).
    fn release_all(&self) {
        for lane in Lane::all() {
            let mut frames = self.lock(lane);
            for (frame, _) in frames.drain(..) {
                self.release(frame.wire_len());
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Resolves once [`Outbox::request_close`] was called, with the requested code.
    pub async fn close_requested(&self) -> ErrorCode {
        loop {
            let code = self.close_code.load(Ordering::Acquire);
            if let Some(code) = ErrorCode::from_u16(code) {
                return code;
            }
            self.close_requested.notified().await;
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.release_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use swarmbus_schema::Class;

    fn frame(n: u8) -> OutFrame {
        OutFrame {
            head: Bytes::from(vec![n]),
            body: Bytes::new(),
        }
    }

    fn outbox(capacity: usize) -> Outbox {
        let queues = QueueConfig {
            session: capacity,
            control: capacity,
            command: capacity,
            alert: capacity,
            reconciliation: capacity,
            telemetry: capacity,
            ..QueueConfig::default()
        };
        Outbox::new(ConnId(1), &queues, Arc::new(Stats::default()))
    }

    fn sized(len: usize) -> OutFrame {
        OutFrame {
            head: Bytes::from(vec![0; len]),
            body: Bytes::new(),
        }
    }

    fn capped(connection_bytes: usize, router_bytes: usize, stats: Arc<Stats>) -> Outbox {
        let queues = QueueConfig {
            connection_bytes,
            router_bytes,
            ..QueueConfig::default()
        };
        Outbox::new(ConnId(1), &queues, stats)
    }

    #[test]
    fn telemetry_takes_at_most_half_the_connection_bytes() {
        let stats = Arc::new(Stats::default());
        let out = capped(1_000, 1 << 20, stats.clone());
        let telemetry = Lane::Class(Class::Telemetry);
        for _ in 0..100 {
            out.push(telemetry, sized(100)).unwrap();
        }
        // 5 frames of 100 bytes fit in half of 1,000; the other 95 were shed, oldest first.
        assert_eq!(out.queued(telemetry), 5);
        assert_eq!(out.shed(telemetry), 95);
        assert_eq!(out.queued_bytes(), 500);
        // The other half stays free for commands; past the cap a command is refused.
        let command = Lane::Class(Class::Command);
        for _ in 0..5 {
            out.try_push(command, sized(100)).unwrap();
        }
        assert_eq!(out.try_push(command, sized(100)), Err(Full));
        // With the budget full of commands, telemetry has no room at all: the new frame is
        // shed after the queued ones.
        out.push(telemetry, sized(100)).unwrap();
        assert!(out.queued(telemetry) < 5);
        assert!(stats.connection_queued_bytes_max.load(Ordering::Relaxed) <= 1_000);
        // Draining gives the bytes back.
        let mut chunks = Vec::new();
        out.drain(command, 100, usize::MAX, &mut chunks, &mut Vec::new());
        assert_eq!(out.queued_bytes(), 100 * out.queued(telemetry));
        out.close();
        assert_eq!(out.queued_bytes(), 0);
        assert_eq!(stats.queued_bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn connections_share_the_router_byte_cap() {
        let stats = Arc::new(Stats::default());
        let a = capped(10_000, 1_500, stats.clone());
        let b = capped(10_000, 1_500, stats.clone());
        let session = Lane::Session;
        for _ in 0..10 {
            a.push(session, sized(100)).unwrap();
        }
        for _ in 0..5 {
            b.push(session, sized(100)).unwrap();
        }
        // The router holds 1,500 bytes: the next session reply cannot be queued, and a
        // session lane may not shed, so the connection is marked lagging.
        assert_eq!(b.push(session, sized(100)), Err(Lagging));
        assert!(b.is_closed());
        assert!(stats.queued_bytes_max.load(Ordering::Relaxed) <= 1_500);
        // b's frames were released when it closed: a has room again.
        assert_eq!(stats.queued_bytes.load(Ordering::Relaxed), 1_000);
        a.push(session, sized(100)).unwrap();
    }

    #[test]
    fn full_telemetry_lane_drops_oldest_and_counts() {
        let out = outbox(3);
        let lane = Lane::Class(Class::Telemetry);
        for n in 0..5 {
            out.push(lane, frame(n)).unwrap();
        }
        assert_eq!(out.shed(lane), 2);
        let mut chunks = Vec::new();
        assert_eq!(
            out.drain(lane, 10, usize::MAX, &mut chunks, &mut Vec::new()),
            3
        );
        let firsts: Vec<u8> = chunks.iter().map(|c| c.head[0]).collect();
        assert_eq!(firsts, vec![2, 3, 4]);
    }

    #[tokio::test]
    async fn full_command_lane_marks_lagging_and_requests_close() {
        let out = outbox(2);
        let lane = Lane::Class(Class::Command);
        out.push(lane, frame(0)).unwrap();
        out.push(lane, frame(1)).unwrap();
        assert_eq!(out.push(lane, frame(2)), Err(Lagging));
        assert_eq!(out.close_requested().await, ErrorCode::Lagging);
        assert!(out.is_closed());
        assert_eq!(out.queued(lane), 0);
        // Pushing after close neither errors nor grows the queue.
        out.push(lane, frame(3)).unwrap();
        assert_eq!(out.queued(lane), 0);
    }

    #[test]
    fn drain_hands_out_the_durable_times_of_live_ordered_deliveries_only() {
        let out = outbox(10);
        let lane = Lane::Class(Class::Command);
        let durable = Instant::now();
        out.try_push_durable(lane, frame(0), durable).unwrap();
        out.try_push(lane, frame(1)).unwrap(); // a catch-up from the log: not stamped
        out.try_push_durable(lane, frame(2), durable).unwrap();
        let (mut chunks, mut stamps) = (Vec::new(), Vec::new());
        assert_eq!(out.drain(lane, 2, usize::MAX, &mut chunks, &mut stamps), 2);
        assert_eq!(stamps, vec![durable]);
        assert_eq!(out.drain(lane, 2, usize::MAX, &mut chunks, &mut stamps), 1);
        assert_eq!(stamps, vec![durable, durable]);
    }

    #[test]
    fn drain_respects_frame_and_byte_budgets() {
        let out = outbox(100);
        let lane = Lane::Session;
        for n in 0..10 {
            out.push(lane, frame(n)).unwrap();
        }
        let mut chunks = Vec::new();
        assert_eq!(
            out.drain(lane, 4, usize::MAX, &mut chunks, &mut Vec::new()),
            4
        );
        chunks.clear();
        assert_eq!(out.drain(lane, 100, 2, &mut chunks, &mut Vec::new()), 2);
        assert_eq!(out.queued(lane), 4);
    }
}
