//! Zero-copy fan-out: the bytes allocated per delivery do not grow with the payload size.
//!
//! A counting global allocator counts allocations made by the current thread only while
//! counting is switched on, so other tests running in parallel do not disturb it. The
//! measured path is the router's real fan-out path: `Core::handle_publish` (one Deliver
//! header per message), the driver's `poll_action` loop and `Outbox::push` per subscriber.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use bytes::Bytes;
use swarmbus_proto::core::{Action, Core};
use swarmbus_proto::ConnId;
use swarmbus_proto::Lane;
use swarmbus_router::config::QueueConfig;
use swarmbus_router::outbox::Outbox;
use swarmbus_router::stats::Stats;
use swarmbus_schema::{Class, Publish};

struct CountingAlloc;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static BYTES: Cell<u64> = const { Cell::new(0) };
}

fn note(size: usize) {
    // try_with: thread-locals may be gone while a thread exits.
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = BYTES.try_with(|b| b.set(b.get() + size as u64));
        }
    });
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

const SUBSCRIBERS: u64 = 50;
const MESSAGES: usize = 200;

/// Bytes allocated per delivery when fanning `MESSAGES` payloads of `payload_bytes` out to
/// `SUBSCRIBERS` outboxes (after a warm-up round that sizes the queues).
fn bytes_per_delivery(payload_bytes: usize) -> f64 {
    let stats = Arc::new(Stats::default());
    let queues = QueueConfig {
        telemetry: MESSAGES * 2,
        ..QueueConfig::default()
    };
    let mut core: Core<Arc<Outbox>> = Core::new(16);
    let outboxes: Vec<Arc<Outbox>> = (0..SUBSCRIBERS)
        .map(|i| Arc::new(Outbox::new(ConnId(i), &queues, stats.clone())))
        .collect();
    let agent: Arc<str> = "agent".into();
    let publisher = Arc::new(Outbox::new(ConnId(u64::MAX), &queues, stats.clone()));
    for outbox in &outboxes {
        core.handle_subscribe(
            outbox.conn(),
            &agent,
            outbox.clone(),
            "swarm",
            Class::Telemetry,
            None,
            None,
        )
        .unwrap();
    }
    let payloads: Vec<Publish> = (0..MESSAGES)
        .map(|i| Publish {
            request_id: 0,
            swarm: "swarm".into(),
            class: Class::Telemetry,
            target_agent: None,
            key: None,
            payload: Bytes::from(vec![i as u8; payload_bytes]),
            fencing_token: 0,
            lease: None,
        })
        .collect();
    let now = swarmbus_router::clock::Clock::new().now();
    let mut chunks = Vec::with_capacity(4 * MESSAGES);
    let mut round = |count: bool| -> (u64, usize) {
        COUNTING.with(|c| c.set(count));
        BYTES.with(|b| b.set(0));
        let mut delivered = 0;
        for publish in &payloads {
            core.handle_publish("ctl", publisher.clone(), publish, now)
                .unwrap();
            while let Some(Action::Deliver {
                to, class, frame, ..
            }) = core.poll_action()
            {
                to.push(Lane::Class(class), frame).unwrap();
                delivered += 1;
            }
        }
        COUNTING.with(|c| c.set(false));
        let allocated = BYTES.with(|b| b.get());
        // Empty the queues (as the writers would) outside the measurement.
        for outbox in &outboxes {
            chunks.clear();
            outbox.drain(
                Lane::Class(Class::Telemetry),
                usize::MAX,
                usize::MAX,
                &mut chunks,
                &mut Vec::new(),
            );
        }
        (allocated, delivered)
    };
    round(false);
    let (allocated, delivered) = round(true);
    assert_eq!(delivered, MESSAGES * SUBSCRIBERS as usize);
    allocated as f64 / delivered as f64
}

#[test]
fn fan_out_allocation_does_not_grow_with_payload_size() {
    let small = bytes_per_delivery(64);
    let large = bytes_per_delivery(64 * 1024);
    eprintln!(
        "bytes allocated per delivery: {small:.2} (64 B payload), {large:.2} (64 KiB payload)"
    );
    // One Deliver header (~100 bytes) per message is shared by its 50 deliveries, so a
    // delivery costs a few bytes; a copy of the payload would cost 64 KiB.
    assert!(
        large < 64.0,
        "{large} bytes allocated per 64 KiB delivery: the payload is copied"
    );
    assert!(
        (large - small).abs() < 8.0,
        "allocation per delivery depends on payload size: {small} B for 64 B, {large} B for 64 KiB"
    );
}
