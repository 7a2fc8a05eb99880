"""No Docker engine runs on our machines, so this runs the Dockerfile's own steps — its COPY lines
in order, its RUN lines, its CMD and its HEALTHCHECK — in a fresh directory and virtual
environment, as the image build would (system packages and the non-root user aside).

The tiny backbone stands in for SmolLM2 (SPA_BACKBONE) to keep the build step short; the install
is the real one."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from cloud_server import free_port, stop

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1200)]


def instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_image_steps_build_and_serve(tmp_path):
    steps = instructions()
    venv, cache, work = tmp_path / "venv", tmp_path / "cache", tmp_path / "app"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "SPA_"))}
    env |= {"SPA_BACKBONE": "tiny-llama", "PATH": f"{venv / 'bin'}:{env['PATH']}"}

    def expand(s: str) -> str:
        s = re.sub(r"--mount=\S+\s+", "", s)  # BuildKit mounts (the pip-cert secret) aside
        s = s.replace("/opt/venv", str(venv)).replace("$TORCH_INDEX", "")  # local wheels here
        return s.replace("$SPA_CACHE_DIR", str(cache))

    healthcheck = cmd = None
    for word, args in steps:
        if word == "ENV":
            pairs = shlex.split(args)
            env |= dict(p.split("=", 1) for p in pairs)
            env["SPA_CACHE_DIR"], env["PATH"] = str(cache), f"{venv / 'bin'}:{os.environ['PATH']}"
        elif word == "COPY":  # a directory's contents, or files into a directory
            *sources, dest = args.split()
            for source in sources:
                src = ROOT / source
                if src.is_dir():
                    shutil.copytree(src, work / dest, dirs_exist_ok=True)
                else:
                    to = work / dest / src.name if dest.endswith("/") else work / dest
                    to.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, to)
        elif word == "RUN":
            if "apt-get" in args:  # system packages and the non-root user: the image's own
                continue
            command = expand(args).replace("&& chown -R spa:spa", "&& true")
            done = subprocess.run(
                ["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True
            )
            assert done.returncode == 0, f"RUN {args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        elif word == "HEALTHCHECK":
            healthcheck = args.split(" CMD ", 1)[1]
        elif word == "CMD":
            cmd = json.loads(args)
    assert cmd is not None and healthcheck is not None
    assert (venv / "bin" / "spa-demo").is_file()
    assert list((cache / "demo" / "tiny-llama").glob("*/checkpoints/*.safetensors"))
    assert list((cache / "targets").glob("*-catalogue*-default.json"))  # the shop's recommender

    port = free_port()
    env["SPA_DEMO_PORT"] = str(port)  # as `docker run -e SPA_DEMO_PORT=...`: UI and probe follow
    server = subprocess.Popen(
        cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    probe = healthcheck
    try:
        deadline, healthy = time.monotonic() + 180, False
        while time.monotonic() < deadline and server.poll() is None and not healthy:
            healthy = subprocess.run(["bash", "-c", probe], env=env).returncode == 0
            time.sleep(1)
        assert healthy, "the HEALTHCHECK never passed"
    finally:
        output = stop(server)
    assert "demo users ready (cached)" in output  # trained at build time, not at start
    assert "UI ready at" in output and server.returncode == 0, output
    serve_openai(work, env)


def serve_openai(work: Path, env: dict) -> None:
    """docs/openai.md's `docker run spa-demo spa device serve --demo …`, on the image's demo
    users (trained at build time), answered through the official OpenAI client."""
    import openai

    docs = (ROOT / "docs" / "openai.md").read_text()
    command = re.search(r"docker run [^\n]*spa-demo \\\n\s*(spa device serve[^\n]*)", docs)
    assert command, "docs/openai.md shows no `docker run … spa device serve` command"
    port = free_port()
    args = shlex.split(command.group(1).replace("8001", str(port)))
    key = "build-test-key"
    server = subprocess.Popen(
        args,
        cwd=work,
        env=env | {"SPA_DEVICE_API_KEY": key},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        deadline, ids = time.monotonic() + 180, []
        while time.monotonic() < deadline and server.poll() is None and not ids:
            with contextlib.suppress(openai.APIConnectionError):
                ids = [m.id for m in client.models.list()]
            time.sleep(1)
        assert {"spa:pirate", "spa:chef", "spa:haiku", "base"} <= set(ids), ids
        reply = client.chat.completions.create(
            model="spa:pirate", messages=[{"role": "user", "content": "Ahoy?"}], max_tokens=4
        )
        assert reply.usage.completion_tokens >= 1 and reply.usage.spa["setting"] == "spa"
        started = psutil.Process(server.pid).children(recursive=True)  # the demo's cloud
    finally:
        output = stop(server)
    assert "demo users ready (cached)" in output, output
    assert started and server.returncode == 0, output
    left = [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left == [], f"SIGTERM left the processes {left} running"
