"""Affine sessions and request/reply through the package: a request reaches the worker the
session is pinned to, and its reply comes back."""

import asyncio

from helpers import WAIT, run, session


def test_a_request_reaches_the_pinned_worker_and_its_reply_comes_back(router):
    async def scenario():
        worker = await session(router, "gpu-1", role="worker")
        await worker.register_worker("node-1", models=["llama"], detect=False)

        async def serve():
            async for request in worker.requests():
                answer = b"echo:" + bytes(request.payload)
                await worker.reply(request.request_id, True, answer)
                return request

        serving = asyncio.ensure_future(serve())
        agent = await session(router, "agent")
        pinned = await agent.open_session("conv-1", "llama")
        assert pinned.node == "node-1" and pinned.session_key == "conv-1"
        reply = await asyncio.wait_for(
            agent.request_worker(b"hi", session_key="conv-1", timeout_ms=5_000), WAIT
        )
        assert reply.ok and bytes(reply.payload) == b"echo:hi" and reply.node == "node-1"
        request = await asyncio.wait_for(serving, WAIT)
        assert request.source_agent == "agent" and request.session_key == "conv-1"
        await agent.close_session("conv-1")

    run(scenario())
