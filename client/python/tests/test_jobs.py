"""Jobs through the package: a worker killed mid-job, the job runs again elsewhere, and
its submitter gets one result."""

import asyncio

import swarmbus

from helpers import WAIT, run, session


async def next_lease(events):
    async for event in events:
        if isinstance(event, swarmbus.JobLease):
            return event
    raise AssertionError("the worker's session ended")


def test_a_killed_workers_job_runs_again_and_its_result_arrives_once(router):
    async def scenario():
        submitter = await session(router, "agent")
        doomed = await session(router, "gpu-a", role="worker")
        doomed_events = doomed.job_events()
        await doomed.set_job_credits(1)
        status = await submitter.submit_job("s", "k1", b"prompt")
        assert status.state == "queued" and not status.duplicate
        again = await submitter.submit_job("s", "k1", b"prompt")
        assert again.job_id == status.job_id and again.duplicate, "one key, one job"
        first = await asyncio.wait_for(next_lease(doomed_events), WAIT)
        assert (first.job_id, first.attempt) == (status.job_id, 1)
        assert bytes(first.payload) == b"prompt" and first.submitter == "agent"
        doomed.close()  # dies mid-job
        survivor = await session(router, "gpu-b", role="worker")
        events = survivor.job_events()
        await survivor.set_job_credits(1)
        second = await asyncio.wait_for(next_lease(events), WAIT)
        assert (second.job_id, second.attempt) == (status.job_id, 2)
        await survivor.job_progress(second.job_id, second.attempt, b"half")
        done = await survivor.finish_job(second.job_id, second.attempt, True, b"answer")
        assert done.state == "completed"
        dedup = swarmbus.JobDedup()
        ends = []
        async for update in submitter.job_updates():
            if update.is_final and dedup.first_time(update):
                ends.append(update)
                await submitter.ack_job(update)
                break
        assert [(e.job_id, e.state, bytes(e.payload)) for e in ends] == [
            (status.job_id, "completed", b"answer")
        ]
        assert not dedup.first_time(ends[0]), "an end once"

    run(scenario())


def test_a_worker_registers_its_node_with_what_detection_found(router):
    async def scenario():
        report = swarmbus.detect_gpus()
        # This machine has no NVIDIA driver: an empty report that says why, no exception.
        assert isinstance(report.gpus, list)
        if not report.gpus:
            assert report.note
        worker = await session(router, "gpu-node-1", role="worker")
        node_id = await worker.register_worker("node-1", models=["llama-3-8b"], zone="rack-a")
        again = await worker.register_worker("node-1", models=["llama-3-8b"], draining=True)
        assert node_id == again, "the same node, restated"
        agent = await session(router, "agent")
        try:
            await agent.register_worker("node-2")
            raise AssertionError("only a worker may register")
        except swarmbus.SwarmbusError as refused:
            assert refused.code is not None

    run(scenario())


# A worker that takes one lease, says so, and hangs (until killed).
HANGING_WORKER = """
import asyncio, sys, swarmbus
async def main():
    worker = await swarmbus.connect(sys.argv[1], ca=sys.argv[2], agent_id="doomed", role="worker", swarms=["s"])
    events = worker.job_events()
    await worker.set_job_credits(1)
    async for event in events:
        if isinstance(event, swarmbus.JobLease):
            print("leased", event.job_id, flush=True)
            await asyncio.sleep(3600)
asyncio.run(main())
"""


def test_a_worker_killed_with_sigkill_mid_job_loses_no_job(router):
    import subprocess
    import sys

    doomed = subprocess.Popen(
        [sys.executable, "-c", HANGING_WORKER, router.addr, router.ca],
        stdout=subprocess.PIPE, text=True,
    )

    async def scenario():
        submitter = await session(router, "agent")
        status = await submitter.submit_job("s", "k-kill", b"work")
        line = await asyncio.get_running_loop().run_in_executor(None, doomed.stdout.readline)
        assert line.split() == ["leased", str(status.job_id)]
        doomed.kill()  # no goodbye: the router finds out from the silence
        doomed.wait(timeout=10)
        survivor = await session(router, "gpu-b", role="worker")
        events = survivor.job_events()
        await survivor.set_job_credits(1)
        lease = await asyncio.wait_for(next_lease(events), 30)
        assert (lease.job_id, lease.attempt) == (status.job_id, 2)
        await survivor.finish_job(lease.job_id, lease.attempt, True, b"done")
        dedup = swarmbus.JobDedup()
        async for update in submitter.job_updates():
            if update.is_final and dedup.first_time(update):
                assert (update.job_id, update.state, bytes(update.payload)) == (
                    status.job_id, "completed", b"done"
                )
                await submitter.ack_job(update)
                break

    try:
        run(scenario())
    finally:
        doomed.kill()


def test_a_dead_letter_is_listed_and_redriven_and_its_new_end_arrives(router):
    async def scenario():
        submitter = await session(router, "agent")
        controller = await session(router, "ops", role="controller")
        worker = await session(router, "gpu-c", role="worker")
        events = worker.job_events()
        await worker.set_job_credits(1)
        status = await submitter.submit_job("s", "k-dead", b"work", max_attempts=1)
        lease = await asyncio.wait_for(next_lease(events), WAIT)
        # Its only attempt asks for a retry: dead-lettered.
        await worker.finish_job(lease.job_id, lease.attempt, False, b"oom", retry=True)
        updates = submitter.job_updates()
        dead = await asyncio.wait_for(updates.__anext__(), WAIT)
        assert (dead.job_id, dead.state) == (status.job_id, "dead_lettered")
        await submitter.ack_job(dead)
        letters, more = await controller.dead_letters("s")
        assert [(d.job_id, d.idempotency_key) for d in letters] == [(status.job_id, "k-dead")]
        assert not more and letters[0].attempts == 1
        requeued = await controller.redrive_job("s", status.job_id)
        assert requeued.state == "queued"
        again = await asyncio.wait_for(next_lease(events), WAIT)
        assert (again.job_id, again.attempt) == (status.job_id, 2)
        await worker.finish_job(again.job_id, again.attempt, True, b"fine")
        async for update in updates:
            if update.is_final:
                assert (update.state, bytes(update.payload)) == ("completed", b"fine")
                break
        assert (await controller.dead_letters("s"))[0] == []

    run(scenario())
