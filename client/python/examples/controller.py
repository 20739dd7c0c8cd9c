"""A controller that commands a swarm while it holds the swarm's fenced `leader` lease.

    python controller.py ROUTER CA AGENT_ID SWARM COMMAND...

Acquires the lease (waiting while another holds it), publishes each COMMAND stamped with
its fencing token, and releases the lease. A command stamped with a token older than the
newest is refused by the router (code 29): the controller was deposed and stops.
"""

import argparse
import asyncio

import swarmbus

LEASE_TTL_MS = 5_000


async def acquire(client, swarm):
    while True:
        try:
            return await client.acquire_lease(swarm, "leader", LEASE_TTL_MS)
        except swarmbus.SwarmbusError as error:
            if error.code != 27:  # LeaseHeld: wait for the holder's time to run out
                raise
            await asyncio.sleep(error.retry_after_ms / 1000)


async def main(args):
    client = await swarmbus.connect(
        args.router, ca=args.ca, agent_id=args.agent_id, role="controller", swarms=[args.swarm]
    )
    grant = await acquire(client, args.swarm)
    for command in args.commands:
        op = await client.publish(
            args.swarm, "command", command.encode(), fencing_token=grant.token, lease="leader"
        )
        print(f"op {op}: {command} (token {grant.token})", flush=True)
    await client.release_lease(grant)
    client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ["router", "ca", "agent_id", "swarm"]:
        parser.add_argument(name)
    parser.add_argument("commands", nargs="+")
    asyncio.run(main(parser.parse_args()))
