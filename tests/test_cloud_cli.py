"""`spa cloud` starts a real server process that serves the API and stops on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
from cloud_server import free_port, spawn, stop, wait_ready
from typer.testing import CliRunner

from app.cli import cli
from cloud_api.settings import CloudSettings

runner = CliRunner(env={"COLUMNS": "250"})  # wide: one help line per option


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
    result = runner.invoke(cli, ["cloud", "--port", "70000", "--tap-dtype", "int8"])
    assert result.exit_code == 2
    assert "port: Input should be less than or equal to 65535" in result.output
    assert "tap_dtype: Input should be 'float16', 'bfloat16' or 'float32'" in result.output


def test_spa_cloud_help_lists_every_setting_with_its_default():
    result = runner.invoke(cli, ["cloud", "--help"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name, field in CloudSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        line = next((ln for ln in lines if ln.strip("│ ").startswith(flag + " ")), None)
        assert line is not None, f"{flag} missing from spa cloud --help"
        default = field.get_default(call_default_factory=True)
        if default is not None:
            assert f"[default: {default}]" in line, line
    assert "[float16|bfloat16|float32]" in result.output  # tap_dtype's choices


def test_spa_cloud_flags_beat_the_environment(monkeypatch):
    served = []
    monkeypatch.setattr("cloud_api.server.serve", served.append)
    monkeypatch.setenv("SPA_CLOUD_PORT", "9001")
    monkeypatch.setenv("SPA_CLOUD_MAX_SESSIONS", "3")
    result = runner.invoke(cli, ["cloud", "--port", "9002", "--session-ttl-s", "12.5"])
    assert result.exit_code == 0, result.output
    (settings,) = served
    assert (settings.port, settings.max_sessions, settings.session_ttl_s) == (9002, 3, 12.5)
    assert settings.host == "127.0.0.1"  # neither flag nor variable: the field's default


def test_spa_cloud_script_refuses_bad_values_on_one_line():
    """`spa-cloud` (its own entry point) reports errors like `spa`: one line, exit code 2."""
    command = [sys.executable, "-c", "from app.cli import cloud_main; cloud_main()"]
    result = subprocess.run(
        [*command, "--max-sessions", "0"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr == "error: max_sessions: Input should be greater than or equal to 1\n"
    assert result.stdout == ""
