"""An agent that applies commands once each and resumes where it stood.

    python agent.py ROUTER CA AGENT_ID SWARM [--count N] [--offsets FILE]

Prints each command it applies; with --count it stops after N. Run it again: it resumes
after the last command it applied (kept in --offsets, default AGENT_ID.offsets).
"""

import argparse
import asyncio

import swarmbus


async def main(args):
    apply = swarmbus.IdempotentApply(args.offsets or f"{args.agent_id}.offsets")
    client = await swarmbus.connect(
        args.router, ca=args.ca, agent_id=args.agent_id, swarms=[args.swarm], resume=apply
    )
    await client.subscribe(args.swarm, "command")  # missed commands first, then live
    print("subscribed", flush=True)
    applied = 0
    async for delivery in client.deliveries():
        if not apply.admit(delivery):
            continue  # a redelivery: applied already
        print(f"applied {delivery.op_id}: {bytes(delivery.payload).decode()}", flush=True)
        apply.save()  # before the ack: a crash in between replays, never skips
        await client.ack(delivery.swarm, delivery.cls, delivery.op_id)
        applied += 1
        if args.count and applied == args.count:
            break
    client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ["router", "ca", "agent_id", "swarm"]:
        parser.add_argument(name)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--offsets")
    asyncio.run(main(parser.parse_args()))
