"""The Docker image for real: build it, `docker run spa-demo`, wait for its HEALTHCHECK, generate
through the page's API for a demo user, check that device-coloured tokens come back, then stop
and remove everything this script started. Writes `benchmarks/results/docker.json` (build time,
image size, time to healthy, the answer).

    make docker-test            # or: python benchmarks/docker_image.py [--base IMAGE] [--keep]

Where no engine answers, it starts one itself when it can (root, `dockerd` installed: vfs
storage, host network, its own data directory under .bench/docker) and stops it at the end;
where it cannot, it says so and exits 0 (skipped). Where the base image cannot be pulled (no
registry reachable), it builds a Debian base with `debootstrap` once and uses that. pip inside
the build gets the machine's own package sources: its `find-links` directory served on
127.0.0.1, and its CA bundle as the BuildKit secret `pip-cert` (never baked into a layer).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from app.cloud_process import free_port, terminate
from benchmarks import harness
from benchmarks.harness import write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "docker.json"
WORK = ROOT / ".bench" / "docker"
DEBIAN_BASE = "spa-base:bookworm"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Skip(Exception):
    """The check cannot run here (no engine, no base image); the message says why."""


def say(message: str) -> None:
    print(f"[docker-test] {message}", flush=True)


DOCKER = ["docker"]  # the client: one with BuildKit (see buildkit_client)


def run(*args: str, check: bool = True, capture: bool = True, **kw) -> subprocess.CompletedProcess:
    if args[0] == "docker":
        args = (DOCKER[0], *args[1:])
    done = subprocess.run(args, capture_output=capture, text=True, **kw)
    if check and done.returncode != 0:
        detail = (done.stderr or done.stdout or "")[-2000:] if capture else ""
        raise RuntimeError(f"{' '.join(args[:4])} … failed ({done.returncode}): {detail}")
    return done


def engine_answers(env: dict) -> bool:
    return (
        shutil.which("docker") is not None
        and run("docker", "info", check=False, env=env).returncode == 0
    )


@contextlib.contextmanager
def engine(stack: contextlib.ExitStack, keep: bool = False):
    """An environment whose `docker` reaches an engine: the running one, or one started here
    (whose data directory — vfs copies every layer: tens of GB — is deleted afterwards unless
    `keep`)."""
    env = dict(os.environ)
    if engine_answers(env):
        yield env
        return
    dockerd = shutil.which("dockerd")
    if dockerd is None or os.geteuid() != 0:
        raise Skip(
            "no Docker engine answers and none can be started here (needs root and dockerd: "
            "apt-get install docker.io)"
        )
    WORK.mkdir(parents=True, exist_ok=True)
    sock = WORK / "docker.sock"
    env["DOCKER_HOST"] = f"unix://{sock}"
    log = open(WORK / "dockerd.log", "ab")  # noqa: SIM115 (closed by the stack)
    stack.callback(log.close)
    say(f"starting dockerd (vfs storage, host network; log {WORK / 'dockerd.log'})")
    daemon = subprocess.Popen(
        [
            dockerd,
            "--storage-driver=vfs",
            "--iptables=false",
            "--bridge=none",
            f"--data-root={WORK / 'data'}",
            f"--exec-root={WORK / 'exec'}",
            f"--pidfile={WORK / 'dockerd.pid'}",
            f"--host=unix://{sock}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def stop() -> None:
        say(f"stopping dockerd (pid {daemon.pid})")
        terminate(daemon, 60)
        if not keep:
            say(f"deleting its data directory {WORK / 'data'}")
            shutil.rmtree(WORK / "data", ignore_errors=True)

    stack.callback(stop)
    deadline = time.monotonic() + 60
    while not engine_answers(env):
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise Skip(f"dockerd did not start (see {WORK / 'dockerd.log'})")
        time.sleep(1)
    yield env


def buildkit_client(env: dict) -> str:
    """A docker client that builds with BuildKit (the Dockerfile's secret mount needs it):
    `docker` with the buildx plugin, else a Docker 20.10–22 client, whose BuildKit is built in."""
    candidates = [shutil.which("docker"), "/usr/bin/docker", "/usr/local/bin/docker"]
    for client in dict.fromkeys(c for c in candidates if c and Path(c).is_file()):
        buildx = subprocess.run([client, "buildx", "version"], capture_output=True, env=env)
        if buildx.returncode == 0:
            return client
        version = subprocess.run([client, "--version"], capture_output=True, text=True).stdout
        if version.startswith(("Docker version 20.", "Docker version 21.", "Docker version 22.")):
            return client
    raise Skip("no docker client here builds with BuildKit: install the buildx plugin")


def base_image(requested: str | None, env: dict) -> str:
    """The image to build FROM: the one asked for, else python:3.11-slim where it can be
    pulled, else a Debian bookworm base made with debootstrap (built once, kept)."""
    if requested:
        return requested
    present = lambda image: run("docker", "image", "inspect", image, check=False, env=env)  # noqa: E731
    if present("python:3.11-slim").returncode == 0:
        return "python:3.11-slim"
    say("pulling python:3.11-slim …")
    if run("docker", "pull", "python:3.11-slim", check=False, env=env).returncode == 0:
        return "python:3.11-slim"
    if present(DEBIAN_BASE).returncode == 0:
        return DEBIAN_BASE
    if shutil.which("debootstrap") is None:
        raise Skip("python:3.11-slim cannot be pulled and debootstrap is not installed")
    say(f"no registry: building {DEBIAN_BASE} with debootstrap (once; ≈ 3 min)")
    with tempfile.TemporaryDirectory(dir=WORK) as rootfs:
        os.chmod(rootfs, 0o755)  # it becomes the image's `/`: the non-root user must enter it
        run(
            "debootstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,python3-pip,make,ca-certificates",
            "bookworm",
            rootfs,
        )
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        run(
            "docker",
            "import",
            "--change",
            f"ENV PATH={SYSTEM_PATH}",
            "-",
            DEBIAN_BASE,
            stdin=tar.stdout,
            env=env,
        )
        tar.wait()
    return DEBIAN_BASE


def pip_config() -> dict[str, str]:
    """This machine's pip settings (`pip config list`), e.g. cert and find-links."""
    done = run(sys.executable, "-m", "pip", "config", "list", check=False)
    out = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        out[key.split(".")[-1]] = value.strip().strip("'")
    return out


@contextlib.contextmanager
def serve_directory(path: Path):
    """`path` over HTTP on 127.0.0.1 (a pip find-links page) while the build runs."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # pip asks once per requirement: no log lines
            pass

    handler = functools.partial(Quiet, directory=str(path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def build(tag: str, base: str, env: dict, stack: contextlib.ExitStack) -> float:
    pip = pip_config()
    args = ["docker", "build", "--network", "host", "-t", tag, "--build-arg", f"BASE_IMAGE={base}"]
    links = pip.get("find-links")
    if links and Path(links).is_dir() and list(Path(links).glob("torch-*cpu*.whl")):
        url = stack.enter_context(serve_directory(Path(links)))
        args += ["--build-arg", f"PIP_FIND_LINKS={url}", "--build-arg", "TORCH_INDEX="]
        say(f"torch's CPU wheel from this machine's find-links ({links}, served at {url})")
    cert = pip.get("cert")
    if cert and Path(cert).is_file():
        args += ["--secret", f"id=pip-cert,src={cert}"]
    say(f"building {tag} FROM {base} (the build prints below)")
    started = time.monotonic()
    run(*args, str(ROOT), capture=False, env=env | {"DOCKER_BUILDKIT": "1"})
    return time.monotonic() - started


def health(name: str, env: dict) -> str:
    done = run("docker", "inspect", "--format", "{{.State.Health.Status}}", name, env=env)
    return done.stdout.strip()


def generate(url: str) -> dict:
    """One greedy answer for the first demo user through the page's API."""
    from gradio_client import Client

    from app.demo_users import DEMO_USERS
    from app.devices import DemoDecoding

    user, controls = DEMO_USERS[0], DemoDecoding()
    out = Client(url, verbose=False).predict(
        user.key,
        user.prompts[0],
        "spa",
        "greedy",
        "datacenter",
        True,
        0.5,
        32,
        0,
        4,
        "pull",
        controls.repetition_penalty,
        controls.no_repeat_ngram_size,
        api_name="/generate",
    )
    tokens = out[-1]["personalised"]
    return {
        "user": user.key,
        "prompt": user.prompts[0],
        "tokens": len(tokens),
        "device_tokens": sum(t["branch"] == "device" for t in tokens),
        "answer": "".join(t["text"] for t in tokens),
    }


def check(args: argparse.Namespace) -> dict:
    with contextlib.ExitStack() as stack:
        env = stack.enter_context(engine(stack, keep=args.keep))
        DOCKER[0] = buildkit_client(env)
        base = base_image(args.base, env)
        seconds = build(args.tag, base, env, stack)
        size = int(
            run("docker", "image", "inspect", "--format", "{{.Size}}", args.tag, env=env).stdout
        )
        say(f"built in {seconds:.0f} s; image {size / 2**30:.2f} GiB")
        run("docker", "builder", "prune", "-af", check=False, env=env)  # the build cache
        if not args.keep:
            stack.callback(run, "docker", "rmi", "-f", args.tag, check=False, env=env)
        name, port = f"spa-demo-check-{uuid.uuid4().hex[:8]}", free_port()
        started = time.monotonic()
        run(
            "docker",
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "host",
            "-e",
            f"SPA_DEMO_PORT={port}",
            "--health-interval",
            "5s",
            "--health-start-period",
            "120s",
            args.tag,
            env=env,
        )
        stack.callback(run, "docker", "rm", "-f", name, check=False, env=env)
        say(f"docker run {args.tag} (container {name}, port {port}); waiting for healthy")
        while (status := health(name, env)) != "healthy":
            if status == "unhealthy" or time.monotonic() - started > args.timeout:
                logs = run("docker", "logs", "--tail", "40", name, check=False, env=env)
                raise RuntimeError(
                    f"container {status} after {time.monotonic() - started:.0f} s:"
                    f"\n{logs.stdout}{logs.stderr}"
                )
            time.sleep(1)
        healthy_s = time.monotonic() - started
        say(f"healthy {healthy_s:.0f} s after docker run; generating through the page")
        answer = generate(f"http://127.0.0.1:{port}/")
        if answer["device_tokens"] == 0:
            raise RuntimeError(f"no device-coloured token came back: {answer}")
        say(
            f"{answer['device_tokens']} / {answer['tokens']} tokens device-coloured: "
            f"{answer['answer']!r}"
        )
        return {
            "base_image": base,
            "build_s": seconds,
            "image_bytes": size,
            "healthy_after_run_s": healthy_s,
            "answer": answer,
        }


def main() -> None:
    parser = harness.parser(__doc__, data=False, backbone=False)
    parser.add_argument("--base", help="BASE_IMAGE (default: python:3.11-slim, else Debian)")
    parser.add_argument("--tag", default="spa-demo")
    parser.add_argument(
        "--keep", action="store_true", help="keep the image (and a started engine's data)"
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds to become healthy")
    parser.add_argument("--table", action="store_true", help="print the README lines and stop")
    args = parser.parse_args()
    if args.table:
        print(summary(json.loads(RESULTS.read_text())))
        return
    try:
        results = check(args)
    except Skip as exc:
        say(f"SKIPPED: {exc}")
        return
    write_results(results, RESULTS)
    say(f"passed; figures in {RESULTS.relative_to(ROOT)}")
    print(summary(json.loads(RESULTS.read_text())))


def summary(r: dict) -> str:
    """The README's lines on the last check."""
    a = r["answer"]
    return (
        f"Last `make docker-test` ({r['date'][:10]}; {r['hardware']}): built FROM "
        f"`{r['base_image']}` in {r['build_s'] / 60:.1f} min (dependencies, then converting the "
        f"backbone and training the three demo users), image {r['image_bytes'] / 2**30:.2f} GiB; "
        f"healthy {r['healthy_after_run_s']:.0f} s after `docker run`; Captain Ada's answer had "
        f"{a['device_tokens']} of {a['tokens']} tokens device-coloured."
    )


if __name__ == "__main__":
    main()
