"""Real uvicorn servers of the cloud API on 127.0.0.1 for the integration tests (tiny backbone).

Each runs in a thread of the test process on a socket bound to a free port, with its own SQLite
file, and stops itself when the `with` block (the fixture) ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from benchmarks.servers import free_port, spawn, stop, wait_ready  # noqa: F401 (shared)
from cloud_api.server import ThreadedServer
from cloud_api.settings import CloudSettings


@contextlib.contextmanager
def running(directory: Path, **limits) -> Iterator[ThreadedServer]:
    settings = CloudSettings(
        backbone="tiny-llama",
        host="127.0.0.1",
        port=0,
        database_url=f"sqlite:///{directory / 'cloud.db'}",
        **limits,
    )
    with ThreadedServer(settings) as server:
        server.wait_ready()
        yield server
