"""`spa cloud` as a process of its own, started and stopped by a benchmark or a test that must
kill or signal the server (its stdout and stderr kept for the failure message)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from app.cloud_process import spa_cloud


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(
    directory: Path,
    port: int,
    backbone: str = "tiny-llama",
    database_url: str | None = None,
    **env: str,
) -> subprocess.Popen:
    """`spa cloud` as its own process (tiny backbone, SQLite in `directory` unless
    `database_url`), for tests that must kill or signal the server; `wait_ready` before use,
    `stop` after."""
    command = spa_cloud(port, backbone, database_url or directory / "cloud.db")
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
        out = process.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        out = process.communicate()[0]
    return out.decode() if isinstance(out, bytes) else out or ""
