"""`spa cloud` starts a real server process that serves the API and stops on SIGTERM."""

from __future__ import annotations

import signal

import httpx
from cloud_server import free_port, spawn, stop, wait_ready
from typer.testing import CliRunner

from app.cli import cli


def test_spa_cloud_serves_until_terminated(tmp_path):
    port = free_port()
    process = spawn(tmp_path, port, SPA_CLOUD_MAX_SESSIONS="3")
    try:
        url = f"http://127.0.0.1:{port}"
        ready = wait_ready(process, url)
        assert ready.json() == {"status": "ready", "backbone": "tiny-llama"}
        token = httpx.post(f"{url}/v1/devices", json={}).json()["token"]
        info = httpx.get(f"{url}/v1/info", headers={"Authorization": f"Bearer {token}"}).json()
        assert info["limits"]["max_sessions"] == 3  # from the environment
    finally:
        output = stop(process)
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught (exit status -15)
    assert process.returncode in (0, -signal.SIGTERM), output
    assert f"on http://127.0.0.1:{port}" in output
    assert (tmp_path / "cloud.db").is_file()


def test_spa_cloud_refuses_bad_flags():
    result = CliRunner().invoke(cli, ["cloud", "--port", "70000", "--tap-dtype", "int8"])
    assert result.exit_code == 2
    assert "port: Input should be less than or equal to 65535" in result.output
    assert "tap_dtype: Input should be 'float16', 'bfloat16' or 'float32'" in result.output
