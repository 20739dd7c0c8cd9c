//! Per-connection outbound queues: one bounded lane for session replies and one per class.
//!
//! Shards push frames; one writer task per lane drains its lane onto that lane's QUIC
//! stream, many frames per write (quinn's chunk API, so payload buffers are written by
//! reference). Lanes are separate so a telemetry stream stalled by flow control never holds
//! up a command: QUIC stream priorities then decide what goes on the wire first.
//!
//! At the limit: a full telemetry lane drops its oldest frame and counts it; control and
//! command deliveries use [`Outbox::try_push`], and a subscriber whose lane is full catches
//! up from the event log instead; a full lane of any other kind marks the connection lagging
//! and asks for it to be closed with `Lagging` (it missed messages it may not lose, and must
//! know it).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use swarmbus_schema::{Class, ErrorCode, OutFrame};
use tokio::sync::Notify;

use crate::config::QueueConfig;
use crate::core::ConnId;
use crate::stats::Stats;

/// Which outbound queue of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Replies on the session stream: Welcome, SubscribeAck, PublishAck, Error.
    Session,
    /// Deliveries of one class on that class's stream.
    Class(Class),
}

impl Lane {
    pub const COUNT: usize = 1 + Class::COUNT;

    pub fn index(self) -> usize {
        match self {
            Lane::Session => 0,
            Lane::Class(class) => 1 + class.index(),
        }
    }

    pub fn all() -> impl Iterator<Item = Lane> {
        std::iter::once(Lane::Session).chain(Class::ALL.into_iter().map(Lane::Class))
    }

    fn sheddable(self) -> bool {
        matches!(self, Lane::Class(class) if class.is_sheddable())
    }
}

/// The queue was full and the lane may not shed: the connection is now lagging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lagging;

/// The lane is full (see [`Outbox::try_push`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

#[derive(Debug)]
struct LaneQueue {
    frames: Mutex<VecDeque<OutFrame>>,
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
}

impl Outbox {
    pub fn new(conn: ConnId, queues: &QueueConfig, stats: Arc<Stats>) -> Self {
        let capacity = |lane: Lane| match lane {
            Lane::Session => queues.session,
            Lane::Class(class) => queues.for_class(class),
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
        }
    }

    pub fn conn(&self) -> ConnId {
        self.conn
    }

    fn lock(&self, lane: Lane) -> MutexGuard<'_, VecDeque<OutFrame>> {
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
        if self.enqueue(lane, frame, lane.sheddable()).is_ok() {
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
        self.enqueue(lane, frame, false)
    }

    /// The one place frames enter a lane: at capacity, `shed` drops the oldest frame (and
    /// counts it), otherwise the frame is refused.
    fn enqueue(&self, lane: Lane, frame: OutFrame, shed: bool) -> Result<(), Full> {
        if self.closed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let queue = &self.lanes[lane.index()];
        let mut frames = self.lock(lane);
        if frames.len() >= queue.capacity {
            if !shed {
                return Err(Full);
            }
            frames.pop_front();
            queue.shed.fetch_add(1, Ordering::Relaxed);
            self.stats.telemetry_shed.fetch_add(1, Ordering::Relaxed);
        }
        let was_empty = frames.is_empty();
        frames.push_back(frame);
        drop(frames);
        if was_empty {
            queue.ready.notify_one();
        }
        Ok(())
    }

    /// Moves up to `max_frames` frames (and about `max_bytes`) into `chunks` as head/body
    /// pairs, returning how many frames were taken.
    pub fn drain(
        &self,
        lane: Lane,
        max_frames: usize,
        max_bytes: usize,
        chunks: &mut Vec<Bytes>,
    ) -> usize {
        let mut frames = self.lock(lane);
        let mut taken = 0;
        let mut bytes = 0;
        while taken < max_frames && bytes < max_bytes {
            let Some(frame) = frames.pop_front() else {
                break;
            };
            bytes += frame.wire_len();
            chunks.push(frame.head);
            if !frame.body.is_empty() {
                chunks.push(frame.body);
            }
            taken += 1;
        }
        taken
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
            self.lock(lane).clear();
            self.lanes[lane.index()].ready.notify_one();
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

#[cfg(test)]
mod tests {
    use super::*;

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
        };
        Outbox::new(ConnId(1), &queues, Arc::new(Stats::default()))
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
        assert_eq!(out.drain(lane, 10, usize::MAX, &mut chunks), 3);
        let firsts: Vec<u8> = chunks.iter().map(|c| c[0]).collect();
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
    fn drain_respects_frame_and_byte_budgets() {
        let out = outbox(100);
        let lane = Lane::Session;
        for n in 0..10 {
            out.push(lane, frame(n)).unwrap();
        }
        let mut chunks = Vec::new();
        assert_eq!(out.drain(lane, 4, usize::MAX, &mut chunks), 4);
        chunks.clear();
        assert_eq!(out.drain(lane, 100, 2, &mut chunks), 2);
        assert_eq!(out.queued(lane), 4);
    }
}
