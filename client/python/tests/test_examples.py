"""The Python examples, run as a user would, against a real router."""

import os
import pathlib
import subprocess
import sys

import asyncio

import swarmbus

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"
# The interpreter the examples run with: this one, or (client/python/test's wheel check)
# a fresh virtual environment's with the built wheel installed.
PYTHON = os.environ.get("EXAMPLES_PYTHON", sys.executable)


def example(name, router, *args):
    return [PYTHON, str(EXAMPLES / name), router.addr, router.ca, *args]


def test_the_agent_applies_the_controllers_commands_once_and_resumes(router, tmp_path):
    offsets = str(tmp_path / "agent.offsets")
    agent = subprocess.Popen(
        example("agent.py", router, "agent-7", "s", "--count", "3", "--offsets", offsets),
        stdout=subprocess.PIPE, text=True,
    )
    # Without a resume point the agent starts with the next op: wait until it subscribed.
    assert agent.stdout.readline().strip() == "subscribed"
    controller = subprocess.run(
        example("controller.py", router, "ctl", "s", "start", "scale-up", "stop"),
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert controller.stdout.splitlines()[0].startswith("op ")
    out, _ = agent.communicate(timeout=60)
    assert agent.returncode == 0
    lines = [line for line in out.splitlines() if line.startswith("applied")]
    assert [line.split(":")[1].strip() for line in lines] == ["start", "scale-up", "stop"]
    # Two more commands while it is away; it comes back for those only.
    subprocess.run(
        example("controller.py", router, "ctl", "s", "again", "last"),
        capture_output=True, text=True, timeout=60, check=True,
    )
    resumed = subprocess.run(
        example("agent.py", router, "agent-7", "s", "--count", "2", "--offsets", offsets),
        capture_output=True, text=True, timeout=60, check=True,
    )
    applied = [line for line in resumed.stdout.splitlines() if line.startswith("applied")]
    assert [line.split(":")[1].strip() for line in applied] == ["again", "last"]


def test_the_worker_answers_a_submitted_job(router):
    worker = subprocess.Popen(
        example("worker.py", router, "gpu-1", "s", "--jobs", "1"), stdout=subprocess.PIPE, text=True
    )

    async def submit():
        submitter = await swarmbus.connect(router.addr, ca=router.ca, agent_id="sub", swarms=["s"])
        status = await submitter.submit_job("s", "job-1", b"hello")
        async for update in submitter.job_updates():
            if update.is_final:
                await submitter.ack_job(update)
                return status.job_id, update

    job_id, end = asyncio.run(asyncio.wait_for(submit(), 60))
    assert (end.job_id, end.state, bytes(end.payload)) == (job_id, "completed", b"HELLO")
    out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0 and "completed" in out
