"""The package against a real router: ordering, payloads, idempotent apply and resume,
refusals with their codes. Every wait is bounded."""

import asyncio

import pytest

import swarmbus

from helpers import WAIT, run, session


def test_commands_arrive_in_op_order_with_their_payloads_in_place(router):
    async def scenario():
        agent = await session(router, "a1")
        await agent.subscribe("s", "command")
        controller = await session(router, "ctl", role="controller")
        ops = [await controller.publish("s", "command", b"cmd-%d" % i) for i in range(50)]
        assert ops == list(range(1, 51)), "op ids from the router, gap-free"
        got = []
        async for delivery in agent.deliveries():
            got.append(delivery)
            if len(got) == 50:
                break
        assert [d.op_id for d in got] == ops
        assert all(d.cls == "command" and d.swarm == "s" for d in got)
        assert got[0].source_agent == "ctl"
        more = await controller.publish_many("s", "command", [b"batch-%d" % i for i in range(20)])
        assert more == list(range(51, 71)), "in order, all durable"
        rest = []
        while len(rest) < 20:
            rest.extend(await asyncio.wait_for(agent.recv_batch(8), WAIT))
        assert [d.op_id for d in rest] == more
        assert bytes(rest[-1].payload) == b"batch-19"
        view = memoryview(got[7].payload)
        assert view.readonly and view.tobytes() == b"cmd-7"
        assert bytes(got[49].payload) == b"cmd-49" and len(got[49].payload) == 6
        agent.close()
        controller.close()

    run(scenario())


def test_a_batched_receive_hands_over_many_deliveries_at_once(router):
    async def scenario():
        agent = await session(router, "a1")
        await agent.subscribe("s", "telemetry")
        sender = await session(router, "sender")
        queued = await sender.publish_batch("s", "telemetry", [b"t%d" % i for i in range(100)])
        assert queued == 100
        received = []
        while len(received) < 100:
            batch = await asyncio.wait_for(agent.recv_batch(64), WAIT)
            assert 0 < len(batch) <= 64
            received.extend(bytes(d.payload) for d in batch)
        assert sorted(received) == sorted(b"t%d" % i for i in range(100))
        assert await sender.publish("s", "telemetry", b"x") is None, "no op id: unordered"

    run(scenario())


def test_idempotent_apply_drops_redeliveries_and_resumes_after_a_restart(router, tmp_path):
    offsets = tmp_path / "offsets"

    async def scenario():
        controller = await session(router, "ctl", role="controller")
        apply = swarmbus.IdempotentApply(offsets)
        agent = await session(router, "a1", resume=apply)
        await agent.subscribe("s", "command")
        for i in range(10):
            await controller.publish("s", "command", b"%d" % i)
        applied = []
        while len(applied) < 10:
            delivery = await asyncio.wait_for(agent.recv(), WAIT)
            if apply.admit(delivery):
                applied.append(delivery.op_id)
            assert not apply.admit(delivery), "the same op again is a redelivery"
        await agent.ack("s", "command", applied[-1])
        apply.save()
        agent.close()
        assert apply.last_applied("s", "command") == 10
        # Published while the agent is away; a new process resumes from its file.
        for i in range(10, 15):
            await controller.publish("s", "command", b"%d" % i)
        resumed = swarmbus.IdempotentApply(offsets)
        assert resumed.last_applied("s", "command") == 10 and len(resumed) == 1
        again = await session(router, "a1", resume=resumed)
        await again.subscribe("s", "command")
        later = []
        while len(later) < 5:
            delivery = await asyncio.wait_for(again.recv(), WAIT)
            if resumed.admit(delivery):
                later.append((delivery.op_id, bytes(delivery.payload)))
        assert later == [(11 + i, b"%d" % (10 + i)) for i in range(5)], "only what it missed"

    run(scenario())


def test_refusals_raise_with_the_routers_code(router):
    async def scenario():
        agent = await session(router, "a1")
        with pytest.raises(swarmbus.SwarmbusError) as refused:
            await agent.subscribe("elsewhere", "command")
        assert refused.value.code == 8, "SwarmNotJoined"
        # As the Rust client classes it: joining the swarm (a new session) would succeed.
        assert refused.value.retry_after_ms == 0 and refused.value.is_transient is True
        assert "elsewhere" in str(refused.value)
        with pytest.raises(ValueError, match="unknown class"):
            await agent.publish("s", "gossip", b"x")
        with pytest.raises(ValueError, match="unknown role"):
            await session(router, "a2", role="king")

    run(scenario())


def test_a_closed_session_ends_its_deliveries(router):
    async def scenario():
        agent = await session(router, "a1")
        agent.close()
        assert await asyncio.wait_for(agent.recv(), WAIT) is None
        with pytest.raises(swarmbus.SwarmbusError) as closed:
            await agent.publish("s", "command", b"x")
        assert closed.value.code is None, "closed here, not refused by the router"

    run(scenario())


def test_a_receive_cancelled_by_its_timeout_loses_nothing(router):
    async def scenario():
        agent = await session(router, "a1")
        await agent.subscribe("s", "command")
        controller = await session(router, "ctl", role="controller")
        ops = await controller.publish_many("s", "command", [b"%d" % i for i in range(300)])
        got = []
        while len(got) < 300:
            try:
                # Timeouts so short that many fire while a delivery is on its way.
                batch = await asyncio.wait_for(agent.recv_batch(7), 0.0005)
            except asyncio.TimeoutError:
                continue
            got.extend(d.op_id for d in batch)
        assert got == ops, "every delivery once, in order"
        with pytest.raises(ValueError, match="ordered"):
            await controller.publish_many("s", "telemetry", [b"x"])

    run(scenario())


def test_help_reads_like_the_rust_docs():
    assert "asyncio" in swarmbus.__doc__
    assert "op id" in swarmbus.Client.publish.__doc__
    assert "router" in swarmbus.connect.__doc__
