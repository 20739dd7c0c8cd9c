"""A router on 127.0.0.1 port 0 for each test, in a data directory of its own."""

import pytest

from routerproc import Router


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
