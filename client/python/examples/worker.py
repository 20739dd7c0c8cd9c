"""A GPU worker that takes inference jobs from a swarm's queue.

    python worker.py ROUTER CA AGENT_ID SWARM [--jobs N] [--models M...]

Registers its node with the router's placement (its GPUs, detected through NVML, and the
models it has loaded), then runs one attempt at a time: it heartbeats its progress and
reports its result (here the prompt upper-cased, standing in for an inference server's
answer). With --jobs it stops after N results. A killed worker's attempt runs again on
another worker.
"""

import argparse
import asyncio

import swarmbus


async def infer(client, lease):
    await client.job_progress(lease.job_id, lease.attempt, b"started")
    answer = bytes(lease.payload).upper()  # the inference call goes here
    return await client.finish_job(lease.job_id, lease.attempt, True, answer)


async def main(args):
    client = await swarmbus.connect(
        args.router, ca=args.ca, agent_id=args.agent_id, role="worker", swarms=[args.swarm]
    )
    # Where this node stands for placement: its GPUs (NVML) and the models it has loaded.
    report = swarmbus.detect_gpus()
    print(f"gpus: {len(report.gpus)} ({report.note or report.source})", flush=True)
    await client.register_worker(args.agent_id, models=args.models)
    events = client.job_events()
    await client.set_job_credits(1)
    done = 0
    async for event in events:
        if isinstance(event, swarmbus.JobCancel):
            continue  # cancelled or fenced between attempts: nothing running to stop
        status = await infer(client, event)
        print(f"job {event.job_id} attempt {event.attempt}: {status.state}", flush=True)
        done += 1
        if args.jobs and done == args.jobs:
            break
    client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ["router", "ca", "agent_id", "swarm"]:
        parser.add_argument(name)
    parser.add_argument("--jobs", type=int, default=0)
    parser.add_argument("--models", nargs="*", default=["llama-3-8b"])
    asyncio.run(main(parser.parse_args()))
