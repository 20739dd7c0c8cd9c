"""A router on 127.0.0.1 port 0 for each test, in a data directory of its own."""

import os
import re
import subprocess

import pytest

START = re.compile(r"listening on (\S+) .*development CA: ([^;)]+)")


class Router:
    def __init__(self, data_dir, env=None):
        binary = os.environ.get("SWARMBUS_ROUTER_BIN", "swarmbus-router")
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

    def stop(self):
        self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def router(tmp_path):
    started = Router(tmp_path / "data")
    yield started
    started.stop()
