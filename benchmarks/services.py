"""PostgreSQL and nginx as processes of their own, started and stopped by a test or a benchmark
(Debian's packages; PLATFORM-NOTES.md): the multi-replica cloud of docs/how-to/cloud.md, for real.

`postgres()` runs a throwaway cluster as the `postgres` user (it refuses to run as root) on
127.0.0.1 and a free port; `nginx()` runs the docs' routing snippet in the foreground with its own
prefix. Both yield once the service answers and stop it by PID, whatever happens in the block.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.servers import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
ROOT = Path(__file__).resolve().parents[1]


class Unavailable(RuntimeError):
    """A service's package is not installed here (a test skips, saying which)."""


def _wait_port(port: int, process: subprocess.Popen, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out = process.stdout.read().decode() if process.stdout else ""
            raise RuntimeError(f"{what} exited ({process.returncode}):\n{out[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout_s:.0f} s")


def _stop(process: subprocess.Popen, signal_: int, grace_s: float = 20) -> None:
    if process.poll() is None:
        process.send_signal(signal_)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A fresh PostgreSQL cluster; yields its SQLAlchemy URL (psycopg 3)."""
    if not (PG_BIN / "postgres").is_file():
        raise Unavailable(f"PostgreSQL 15 is not installed ({PG_BIN}): apt-get install postgresql")
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise Unavailable("PostgreSQL's `postgres` user does not exist here") from None
    # the cluster's user must reach its directory: a root-only pytest tmp_path will not do
    root = Path(tempfile.mkdtemp(prefix="spa-postgres-"))
    try:
        os.chown(root, user.pw_uid, user.pw_gid)
        data, port = root / "data", free_port()
        as_postgres = {"user": user.pw_uid, "group": user.pw_gid, "cwd": root}
        subprocess.run(
            [PG_BIN / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync"],
            check=True,
            capture_output=True,
            **as_postgres,
        )
        server = subprocess.Popen(
            [PG_BIN / "postgres", "-D", data, "-p", str(port), "-k", root,
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=on"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            **as_postgres,
        )  # fmt: skip
        try:
            _wait_port(port, server, "postgres")
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        finally:
            _stop(server, 2)  # SIGINT: PostgreSQL's fast shutdown
    finally:
        shutil.rmtree(root, ignore_errors=True)


def docs_nginx_snippet() -> str:
    """The nginx routing of docs/how-to/cloud.md, as the docs show it."""
    text = (ROOT / "docs/how-to/cloud.md").read_text()
    return re.search(r"```nginx\n(.*?)```", text, re.S).group(1)


def nginx_config(replicas: dict[str, int], listen: int, prefix: Path) -> str:
    """The docs' snippet with these replicas' addresses and a plain listener on 127.0.0.1 (the
    test has no certificate), inside the few lines nginx needs to run as a user's process."""
    snippet = docs_nginx_snippet()
    upstreams = [
        f"upstream {name} {{ server 127.0.0.1:{port}; }}" for name, port in replicas.items()
    ]
    every = " ".join(f"server 127.0.0.1:{port};" for port in replicas.values())
    snippet = re.sub(r"upstream r\d+ \{[^}]*\}\n", "", snippet)
    snippet = re.sub(
        r"upstream spa_any \{[^}]*\}",
        "\n".join([*upstreams, f"upstream spa_any {{ least_conn; {every} }}"]),
        snippet,
    )
    snippet = snippet.replace("listen 443 ssl;", f"listen 127.0.0.1:{listen};")
    temp = " ".join(
        f"{k}_temp_path {prefix / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"pid {prefix / 'nginx.pid'};\nerror_log {prefix / 'error.log'} warn;\n"
        "events { worker_connections 256; }\n"
        f"http {{\n access_log {prefix / 'access.log'};\n {temp}\n{snippet}}}\n"
    )


@contextlib.contextmanager
def nginx(replicas: dict[str, int], prefix: Path) -> Iterator[str]:
    """nginx in the foreground routing to `replicas` (name → port); yields its URL."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).is_file():
        raise Unavailable("nginx is not installed: apt-get install nginx-light")
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_config(replicas, port, prefix))
    process = subprocess.Popen(
        [binary, "-p", prefix, "-c", conf, "-g", "daemon off;"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_port(port, process, "nginx")
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(process, 3)  # SIGQUIT: graceful
