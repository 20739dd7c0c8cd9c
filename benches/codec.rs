//! Frame verify/decode and encode costs, by payload size.

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use swarmbus_schema::{
    decode, encode, encode_deliver_head, Class, DecodeOptions, Deliver, Epoch, FrameDecoder,
    Message, OpId, Publish,
};

fn publish(size: usize) -> Message {
    Message::Publish(Publish {
        request_id: 42,
        swarm: "swarm-7".into(),
        class: Class::Telemetry,
        target_agent: None,
        key: Some("gpu-temp".into()),
        payload: Bytes::from(vec![0xA5; size]),
        fencing_token: 0,
        lease: None,
    })
}

fn deliver(size: usize) -> Message {
    Message::Deliver(Deliver {
        swarm: "swarm-7".into(),
        class: Class::Command,
        op_id: OpId(123_456),
        epoch: Epoch(42),
        source_agent: "controller-1".into(),
        target_agent: Some("agent-3".into()),
        key: Some("task".into()),
        payload: Bytes::from(vec![0xA5; size]),
        fencing_token: 0,
        lease: None,
        published_us: 0,
    })
}

fn decode_benches(c: &mut Criterion) {
    let options = DecodeOptions::default();
    let mut group = c.benchmark_group("decode");
    for size in [64usize, 256, 4096] {
        for (name, message) in [("publish", publish(size)), ("deliver", deliver(size))] {
            // The bytes after the length prefix, as the frame decoder yields them.
            let frame = Bytes::from(encode(&message).to_vec()).slice(4..);
            group.throughput(Throughput::Elements(1));
            group.bench_with_input(BenchmarkId::new(name, size), &frame, |b, frame| {
                b.iter(|| decode(black_box(frame.clone()), &options).unwrap())
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("frame_decoder");
    // 64 Publish frames of 256 B in one chunk, as read from a stream.
    let one = encode(&publish(256)).to_vec();
    let chunk = Bytes::from(one.repeat(64));
    group.throughput(Throughput::Elements(64));
    group.bench_function("cut_and_decode_64x256B", |b| {
        b.iter(|| {
            let mut decoder = FrameDecoder::new(1 << 20);
            decoder.push(chunk.clone());
            let mut n = 0;
            while let Some(message) = decoder.next_message(&options).unwrap() {
                black_box(message);
                n += 1;
            }
            assert_eq!(n, 64);
        })
    });
    group.finish();
}

fn encode_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("deliver_head", |b| {
        b.iter(|| {
            encode_deliver_head(
                black_box("swarm-7"),
                Class::Command,
                OpId(123_456),
                Epoch(42),
                "controller-1",
                Some("agent-3"),
                Some("task"),
                256,
                0,
                None,
                1_700_000_000_000_000,
            )
        })
    });
    let message = publish(256);
    group.bench_function("publish_256B", |b| b.iter(|| encode(black_box(&message))));
    group.finish();
}

criterion_group!(benches, decode_benches, encode_benches);
criterion_main!(benches);
