"""Leases with fencing tokens, presence, credentials, through the package."""

import asyncio

import pytest

import swarmbus

from helpers import WAIT, run, session


def test_one_lease_holder_and_its_successor_fences_the_old_token(router):
    async def scenario():
        agent = await session(router, "a1")
        await agent.subscribe("s", "command")
        first = await session(router, "leader-1", role="controller")
        second = await session(router, "leader-2", role="controller")
        # Long enough that the refusal below comes well within it on a loaded machine.
        grant = await first.acquire_lease("s", "leader", 1_500)
        assert grant.holder == "leader-1" and grant.token >= 1
        with pytest.raises(swarmbus.SwarmbusError) as held:
            await second.acquire_lease("s", "leader", 300)
        assert held.value.code == 27 and held.value.retry_after_ms > 0, "LeaseHeld"
        await first.publish("s", "command", b"old", fencing_token=grant.token, lease="leader")
        # The holder stops renewing; once its lease ran out the other takes over.
        await asyncio.sleep(1.7)
        successor = await second.acquire_lease("s", "leader", 5_000)
        assert successor.token > grant.token
        with pytest.raises(swarmbus.SwarmbusError) as lost:
            await first.renew_lease(grant, 300)
        assert lost.value.code == 28, "LeaseLost"
        with pytest.raises(swarmbus.SwarmbusError) as stale:
            await first.publish("s", "command", b"stale", fencing_token=grant.token, lease="leader")
        assert stale.value.code == 29, "StaleFencingToken"
        await second.publish("s", "command", b"new", fencing_token=successor.token, lease="leader")
        fencing = swarmbus.FencingFilter()
        got = []
        while len(got) < 2:
            delivery = await asyncio.wait_for(agent.recv(), WAIT)
            if fencing.admit(delivery):
                got.append((bytes(delivery.payload), delivery.fencing_token))
        assert got == [(b"old", grant.token), (b"new", successor.token)]
        assert fencing.newest("s", "leader") == successor.token
        assert not fencing.admit_token("s", "leader", grant.token), "older than the newest"
        await second.release_lease(successor)
        assert (await first.acquire_lease("s", "leader", 300)).token > successor.token

    run(scenario())


def test_presence_lists_the_sessions_of_a_swarm(router):
    async def scenario():
        watcher = await session(router, "watcher", role="controller")
        worker = await session(router, "w1", role="worker")
        members = {m.agent: m for m in await watcher.presence("s")}
        assert set(members) == {"watcher", "w1"}
        assert members["w1"].role == "worker" and members["w1"].last_seen_ms > 0
        worker.close()
        for _ in range(100):
            if {m.agent for m in await watcher.presence("s")} == {"watcher"}:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the closed session left presence")

    run(scenario())


def test_a_router_requiring_credentials_admits_a_signed_one_and_refuses_none(auth_router):
    async def scenario():
        token = auth_router.credential("a1", "agent")
        agent = await session(auth_router, "a1", credential=token)
        await agent.subscribe("s", "command")
        with pytest.raises(swarmbus.SwarmbusError) as refused:
            await session(auth_router, "a2")
        assert refused.value.code == 37, "a credential is required"
        with pytest.raises(swarmbus.SwarmbusError):
            await session(auth_router, "someone-else", credential=token)

    run(scenario())


def test_a_controller_stops_an_agent_and_the_router_refuses_it_meanwhile(router):
    async def scenario():
        controller = await session(router, "ops", role="controller")
        agent = await session(router, "rogue")
        await controller.stop_agent("rogue", 60_000)
        assert await asyncio.wait_for(agent.recv(), WAIT) is None, "its session was closed"
        with pytest.raises(swarmbus.SwarmbusError) as refused:
            await session(router, "rogue")
        assert refused.value.code == 36, "Stopped"

    run(scenario())


def test_configuration_set_by_a_controller_reaches_a_config_view(router):
    async def scenario():
        agent = await session(router, "a1")
        await agent.subscribe("s", "control")
        controller = await session(router, "ops", role="controller")
        first = await controller.set_config("s", "temperature", b"0.2")
        second = await controller.set_config("s", "model", b"llama")
        removed = await controller.set_config("s", "temperature", b"")
        view = swarmbus.ConfigView("s")
        while view.version < removed:
            view.apply(await asyncio.wait_for(agent.recv(), WAIT))
        assert first < second < removed == view.version
        assert bytes(view.get("model")) == b"llama" and view.get("temperature") is None
        assert [(name, bytes(value)) for name, value in view.entries()] == [("model", b"llama")]

    run(scenario())
