"""`spa cloud` starts a real server process that serves the API and stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
from typer.testing import CliRunner

from app.cli import cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_spa_cloud_serves_until_terminated(tmp_path):
    port = _free_port()
    env = os.environ | {"SPA_CLOUD_MAX_SESSIONS": "3", "SPA_CACHE_DIR": str(tmp_path)}
    command = [sys.executable, "-c", "from app.cli import main; main()", "cloud",
               "--port", str(port), "--backbone", "tiny-llama", "--log-level", "warning",
               "--database-url", f"sqlite:///{tmp_path / 'cloud.db'}"]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url, ready = f"http://127.0.0.1:{port}", None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            try:
                ready = httpx.get(f"{url}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        if ready is None or ready.status_code != 200:  # say why: the server's own output
            process.send_signal(signal.SIGTERM)
            output = process.communicate(timeout=30)[0].decode()
            raise AssertionError(f"spa cloud never became ready (exit {process.poll()}):\n{output}")
        assert ready.json() == {"status": "ready", "backbone": "tiny-llama"}
        token = httpx.post(f"{url}/v1/devices", json={}).json()["token"]
        info = httpx.get(f"{url}/v1/info", headers={"Authorization": f"Bearer {token}"}).json()
        assert info["limits"]["max_sessions"] == 3  # from the environment
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            output = process.communicate(timeout=30)[0].decode()
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0].decode()
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught (exit status -15)
    assert process.returncode in (0, -signal.SIGTERM), output
    assert f"on http://127.0.0.1:{port}" in output
    assert (tmp_path / "cloud.db").is_file()


def test_spa_cloud_refuses_bad_flags():
    result = CliRunner().invoke(cli, ["cloud", "--port", "70000", "--tap-dtype", "int8"])
    assert result.exit_code == 2
    assert "port: Input should be less than or equal to 65535" in result.output
    assert "tap_dtype: Input should be 'float16', 'bfloat16' or 'float32'" in result.output
