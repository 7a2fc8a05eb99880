"""The embedded cloud as a child process: `spa cloud` (a real uvicorn server) on a free local
port for the length of a `with` block. Used by `spa demo` and `spa federate`, which both need one
cloud that every device they start talks to over HTTP."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from personalization.errors import SpaError

PROJECT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def terminate(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM, then SIGKILL if `process` is still there after `grace_s`; reaped either way."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def spa_cloud(port: int, backbone: str, database: Path | str) -> list[str]:
    """The command line of `spa cloud` on `port` with its records in the SQLite file `database`
    (or at `database`, a SQLAlchemy URL)."""
    url = database if isinstance(database, str) else f"sqlite:///{database}"
    return [sys.executable, "-c", "from app.cli import main; main()", "cloud", "--port",
            str(port), "--backbone", backbone, "--log-level", "warning",
            "--database-url", url]  # fmt: skip


class CloudStartError(SpaError, RuntimeError):
    """The cloud this process started exited, or was not ready in time (its log says why)."""


@contextlib.contextmanager
def cloud(
    backbone: str,
    work: Path,
    timeout_s: float = 600,
    port: int | None = None,
    on_wait: Callable[[float], None] | None = None,
    catalogue: Path | None = None,
) -> Iterator[str]:
    """`spa cloud` with its records and log in `work` (and `catalogue` to recommend from);
    yields its URL once it is ready."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    work.mkdir(parents=True, exist_ok=True)
    command = spa_cloud(port, backbone, work / "cloud.db")
    if catalogue is not None:
        command += ["--catalogue", str(Path(catalogue).resolve())]
    log = (work / "cloud.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT)
    try:
        started = time.monotonic()
        while True:
            if process.poll() is not None:
                raise CloudStartError(f"the cloud exited ({process.returncode}); see {log.name}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            waited = time.monotonic() - started
            if waited > timeout_s:
                raise CloudStartError(
                    f"the cloud was not ready in {timeout_s:.0f} s; see {log.name}"
                )
            if on_wait is not None:
                on_wait(waited)
            time.sleep(0.3)
        yield url
    finally:
        terminate(process, 30)
        log.close()
