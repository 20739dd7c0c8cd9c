"""A resilient session through a router restart (SIGKILL, then started again on the same
address and data): it reconnects, subscribes again and resumes; every command once."""

import asyncio
import socket

import swarmbus

from routerproc import Router

WAIT = 30


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_deliveries_go_on_across_a_router_restart(tmp_path):
    router = Router(tmp_path / "data", listen=f"127.0.0.1:{free_udp_port()}")
    try:
        async def publish(texts):
            controller = await swarmbus.connect(
                router.addr, ca=router.ca, agent_id="ctl", role="controller", swarms=["s"]
            )
            ops = [await controller.publish("s", "command", t.encode()) for t in texts]
            controller.close()
            return ops

        async def scenario():
            apply = swarmbus.IdempotentApply()
            agent = await swarmbus.connect_resilient(
                router.addr, ca=router.ca, agent_id="a1", swarms=["s"], base_ms=50, cap_ms=500
            )
            await agent.subscribe("s", "command")
            before = await publish(["one", "two", "three"])
            applied = []

            async def take(count):
                while len(applied) < count:
                    delivery = await asyncio.wait_for(agent.recv(), WAIT)
                    # Resumed at the seam: nothing comes twice, so every delivery is new.
                    assert apply.admit(delivery), f"op {delivery.op_id} again"
                    applied.append((delivery.op_id, bytes(delivery.payload)))
                    await agent.ack("s", "command", delivery.op_id)

            await take(3)
            await asyncio.get_running_loop().run_in_executor(None, router.restart)
            after = await publish(["four", "five"])
            await take(5)
            assert [op for op, _ in applied] == before + after == [1, 2, 3, 4, 5]
            assert [p for _, p in applied] == [b"one", b"two", b"three", b"four", b"five"]
            assert agent.reconnects >= 1
            agent.close()

        asyncio.run(asyncio.wait_for(scenario(), 90))
    finally:
        router.stop()
