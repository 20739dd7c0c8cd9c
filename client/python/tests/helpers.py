"""What the package's tests share: a bounded run, a session on a test router."""

import asyncio

import swarmbus

# The longest wait for one event in a test.
WAIT = 10


def run(coroutine):
    """Runs a test's scenario, failing it after a minute."""
    return asyncio.run(asyncio.wait_for(coroutine, 60))


async def session(router, agent_id, role="agent", **options):
    """A session of `agent_id` in swarm "s" of `router`."""
    return await swarmbus.connect(
        router.addr, ca=router.ca, agent_id=agent_id, role=role, swarms=["s"], **options
    )
