"""Real uvicorn servers of the cloud API on 127.0.0.1 for the integration tests (tiny backbone).

Each runs in a thread of the test process on a socket bound to a free port, with its own SQLite
file, and stops itself when the `with` block (the fixture) ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(directory: Path, port: int, backbone: str = "tiny-llama", **env: str) -> subprocess.Popen:
    """`spa cloud` as its own process (tiny backbone, SQLite in `directory`), for tests that
    must kill or signal the server; `wait_ready` before use, `stop` after."""
    command = [sys.executable, "-c", "from app.cli import main; main()", "cloud",
               "--port", str(port), "--backbone", backbone, "--log-level", "warning",
               "--database-url", f"sqlite:///{directory / 'cloud.db'}"]  # fmt: skip
    env = os.environ | env
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_ready(process: subprocess.Popen, url: str, timeout_s: float = 90) -> httpx.Response:
    """Poll /readyz until 200; on failure, raise with the server's own output."""
    ready, deadline = None, time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(httpx.TransportError):
            ready = httpx.get(f"{url}/readyz", timeout=2)
            if ready.status_code == 200:
                return ready
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=30)[0].decode()
    raise AssertionError(f"spa cloud never became ready (exit {process.poll()}):\n{output}")


def stop(process: subprocess.Popen) -> str:
    """SIGTERM, then SIGKILL if it lingers; returns its output."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.communicate(timeout=30)[0].decode()
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()[0].decode()
