"""A swarmbus router process on 127.0.0.1 port 0, for the tests and the bench."""

import os
import re
import subprocess

START = re.compile(r"listening on (\S+) .*development CA: ([^;)]+)")
BINARY = os.environ.get("SWARMBUS_ROUTER_BIN", "swarmbus-router")


class Router:
    """Started by `Router(data_dir)` (the binary: $SWARMBUS_ROUTER_BIN, else on PATH),
    ready once built: `addr` and `ca` (its development CA) say where and whom to trust."""

    def __init__(self, data_dir, env=None, binary=None, listen="127.0.0.1:0"):
        self.data_dir, self.env, self.binary = data_dir, env, binary
        binary = binary or BINARY
        environment = dict(os.environ, SWARMBUS_ADMIN_LISTEN="127.0.0.1:0", SWARMBUS_LOG="warn")
        # The router refuses SWARMBUS_* variables it does not know.
        environment.pop("SWARMBUS_ROUTER_BIN", None)
        environment.update(env or {})
        self.process = subprocess.Popen(
            [binary, "--listen", listen, "--data-dir", str(data_dir)],
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

    def restart(self):
        """Kills the router (SIGKILL) and starts it again on its address and data dir."""
        self.stop()
        self.__init__(self.data_dir, self.env, self.binary, listen=self.addr)

    def stop(self):
        self.process.kill()
        self.process.wait(timeout=10)
