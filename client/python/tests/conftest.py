"""A router on 127.0.0.1 port 0 for each test, in a data directory of its own."""

import os
import re
import subprocess

import pytest

START = re.compile(r"listening on (\S+) .*development CA: ([^;)]+)")


BINARY = os.environ.get("SWARMBUS_ROUTER_BIN", "swarmbus-router")


class Router:
    def __init__(self, data_dir, env=None):
        self.data_dir = data_dir
        binary = BINARY
        environment = dict(os.environ, SWARMBUS_ADMIN_LISTEN="127.0.0.1:0", SWARMBUS_LOG="warn")
        # The router refuses SWARMBUS_* variables it does not know.
        environment.pop("SWARMBUS_ROUTER_BIN", None)
        environment.update(env or {})
        self.process = subprocess.Popen(
            [binary, "--listen", "127.0.0.1:0", "--data-dir", str(data_dir)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=environment,
            text=True,
        )
        for line in self.process.stdout:
            match = START.search(line)
            if match:
                self.addr, self.ca = match.group(1), match.group(2).strip()
                break
        else:
            raise RuntimeError("the router exited before it was ready")

    def credential(self, agent, role, swarm="s"):
        """A credential for `agent` as `role` in `swarm`, signed with the data dir's
        development key (`swarmbus-router creds issue`)."""
        issued = subprocess.run(
            [BINARY, "creds", "issue", "--data-dir", str(self.data_dir), "--agent", agent,
             "--role", role, "--swarm", swarm, "--ttl", "10m"],
            capture_output=True, text=True, check=True,
            env={k: v for k, v in os.environ.items() if k != "SWARMBUS_ROUTER_BIN"},
        )
        return issued.stdout.strip()

    def stop(self):
        self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def router(tmp_path):
    started = Router(tmp_path / "data")
    yield started
    started.stop()


@pytest.fixture
def auth_router(tmp_path):
    """A router that requires credentials."""
    started = Router(tmp_path / "data", env={"SWARMBUS_AUTH_MODE": "required"})
    yield started
    started.stop()
