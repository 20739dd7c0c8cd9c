"""The Python package against the Rust client, in one run on one router.

    python client/python/bench.py --router-bin target/release/swarmbus-router \\
        --loadgen target/release/swarmbus-loadgen [--rounds 5] [--messages 200000]

Measures, each round, on one release router:
- deliveries/s into Python for one agent, 256 B telemetry, one at a time (`recv`) and
  batched (`recv_batch(256)`), a Python publisher sending with `publish_batch`; the Rust
  client's in the same shape: `swarmbus-loadgen fanout --swarms 1 --agents 1`;
- acknowledged commands/s from Python (`publish`, 64 in flight; `publish_many`, two
  groups of 32 in flight); the Rust client's:
  `swarmbus-loadgen durable --swarms 1 --window 64`.
Prints one JSON object with every round and the medians (docs/performance.md).
"""

import argparse
import asyncio
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent / "tests"))

import swarmbus  # noqa: E402
from routerproc import Router  # noqa: E402

PAYLOAD = b"x" * 256


async def receive_rate(router, swarm, messages, batched):
    """Deliveries/s into Python, from the first to the last delivery received."""
    agent = await swarmbus.connect(router.addr, ca=router.ca, agent_id=f"{swarm}-a", swarms=[swarm])
    await agent.subscribe(swarm, "telemetry")
    sender = await swarmbus.connect(router.addr, ca=router.ca, agent_id=f"{swarm}-p", swarms=[swarm])

    async def publish():
        for _ in range(messages // 256):
            await sender.publish_batch(swarm, "telemetry", [PAYLOAD] * 256)

    publishing = asyncio.create_task(publish())
    received, first, last = 0, None, None
    while received < messages:
        try:
            if batched:
                got = len(await asyncio.wait_for(agent.recv_batch(256), 2))
            else:
                got = 1 if await asyncio.wait_for(agent.recv(), 2) is not None else 0
        except asyncio.TimeoutError:
            break  # the rest was shed (telemetry is best effort)
        now = time.perf_counter()
        first = first or now
        last, received = now, received + got
    await publishing
    agent.close()
    sender.close()
    return received / (last - first) if last and last > first else 0.0, received


async def publish_rate(router, swarm, commands, many, window=64):
    """Acknowledged commands/s from Python: `publish` with `window` in flight, or
    `publish_many` in groups of `window`."""
    client = await swarmbus.connect(
        router.addr, ca=router.ca, agent_id=f"{swarm}-c", role="controller", swarms=[swarm]
    )
    slots = asyncio.Semaphore(window)

    async def one():
        async with slots:
            await client.publish(swarm, "command", PAYLOAD)

    started = time.perf_counter()
    if many:
        # Two groups in flight, so that one fills while the other's acks come back.
        group = [PAYLOAD] * (window // 2)
        pending = set()
        for _ in range(commands // len(group)):
            pending.add(asyncio.ensure_future(client.publish_many(swarm, "command", group)))
            if len(pending) >= 2:
                finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*pending)
    else:
        await asyncio.gather(*(one() for _ in range(commands)))
    elapsed = time.perf_counter() - started
    client.close()
    return commands / elapsed


def loadgen(args, router, scenario, *flags):
    out = subprocess.run(
        [args.loadgen, scenario, "--router", router.addr, "--ca", router.ca, *flags, "--json"],
        capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def round_of(args, router, n):
    rust_receive = loadgen(
        args, router, "fanout", "--swarms", "1", "--agents", "1", "--payload", "256B",
        "--rate", "0", "--duration", "5s", "--class", "telemetry",
    )["delivered_per_s"]
    one, got_one = asyncio.run(receive_rate(router, f"one-{n}", args.messages, False))
    batch, got_batch = asyncio.run(receive_rate(router, f"batch-{n}", args.messages, True))
    rust_publish = loadgen(
        args, router, "durable", "--swarms", "1", "--window", "64", "--duration", "5s",
        "--payload", "256",
    )["acked_per_s"]
    python_publish = asyncio.run(publish_rate(router, f"pub-{n}", args.commands, False))
    python_many = asyncio.run(publish_rate(router, f"many-{n}", args.commands, True))
    return {
        "rust_receive_per_s": rust_receive,
        "python_recv_per_s": round(one),
        "python_recv_received": got_one,
        "python_recv_batch_per_s": round(batch),
        "python_recv_batch_received": got_batch,
        "rust_publish_acked_per_s": rust_publish,
        "python_publish_acked_per_s": round(python_publish),
        "python_publish_many_acked_per_s": round(python_many),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--router-bin", required=True)
    parser.add_argument("--loadgen", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--commands", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        router = Router(pathlib.Path(data), binary=args.router_bin)
        try:
            rounds = [round_of(args, router, n) for n in range(args.rounds)]
        finally:
            router.stop()
    medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    medians["python_recv_vs_rust"] = round(medians["python_recv_per_s"] / medians["rust_receive_per_s"], 3)
    medians["python_recv_batch_vs_rust"] = round(
        medians["python_recv_batch_per_s"] / medians["rust_receive_per_s"], 3
    )
    for key in ["python_publish_acked_per_s", "python_publish_many_acked_per_s"]:
        medians[key.replace("_acked_per_s", "_vs_rust")] = round(
            medians[key] / medians["rust_publish_acked_per_s"], 3
        )
    print(json.dumps({"rounds": rounds, "medians": medians}))


if __name__ == "__main__":
    main()
