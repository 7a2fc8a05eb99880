"""`spa federate --deployment`: the same ServerApp and ClientApp under Flower's deployment runtime.

One SuperLink and one SuperNode per device, each a separate process (as on real machines), on
127.0.0.1 without TLS. Each SuperNode's node config names its user and its own private store:

    partition-id=0 num-partitions=3 user-id="u0" store-dir="/abs/work/devices/device-0"

The run is submitted with `flwr run <project> spa --format json` against the SuperLink's address
(written to the `flwr` CLI's own `$FLWR_HOME/config.toml`) and polled with `flwr ls` until it
finishes. Leaving the `with` block stops the SuperNodes (SIGTERM: they unregister), then the
SuperLink, then any Flower process still left among this process's descendants — this process is
their subreaper, so an orphaned SuperExec or ClientApp is found and reaped too. Which process is
which is written to `<work>/deployment.json` while they run.

Flower 1.41 specifics (docs/dev/flower-deployment.md): every SuperLink API shares one port; each
SuperNode needs a port of its own and a FLWR_HOME of its own; node-config values are TOML.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil

from app.cloud_process import free_port
from app.federation.env import PROJECT, flower_env, run_config
from personalization.errors import SpaError

#: the programs of Flower's deployment runtime; none may outlive a deployment
FLOWER_PROGRAMS = (
    "flower-superlink",
    "flower-supernode",
    "flower-superexec",
    "flwr-serverapp",
    "flwr-clientapp",
)
CONNECTION = "spa"  # the `flwr` CLI's name for this SuperLink


class DeploymentError(SpaError, RuntimeError):
    """A SuperLink or SuperNode did not start, or the run did not finish (the logs say why)."""


@dataclass(frozen=True)
class NodeSpec:
    """One device: the user it serves and where it keeps its private store."""

    partition: int
    user: str
    store: Path

    def node_config(self, partitions: int) -> str:
        # TOML values: strings quoted (json.dumps escapes like a TOML basic string)
        return (
            f"partition-id={self.partition} num-partitions={partitions} "
            f"user-id={json.dumps(self.user)} store-dir={json.dumps(str(self.store))}"
        )


@dataclass
class Started:
    name: str
    pid: int
    port: int
    log: str


def _become_subreaper() -> None:
    """Orphaned Flower processes (a SuperExec whose parent died) become our children, so the
    sweep finds and reaps them instead of leaving zombies that still pass `kill(pid, 0)`."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def flower_descendants(root: int | None = None) -> dict[int, str]:
    """Flower processes below `root` (default: this process), by PID → program name."""
    out = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(root or os.getpid()).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmdline = " ".join(child.cmdline())
                name = next((p for p in FLOWER_PROGRAMS if p in cmdline), "")
                if name:
                    out[child.pid] = name
    return out


def _reap_zombies() -> None:
    """Reap our dead children that nobody waits for (Flower processes orphaned to us by a
    killed SuperNode: a zombie has no command line left to be recognised by)."""
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Deployment:
    """A SuperLink and SuperNodes as separate processes, stopped on leaving the `with` block."""

    def __init__(self, work: Path, nodes: list[NodeSpec], *, start_timeout_s: float = 120.0):
        self.work = work.resolve()
        self.nodes = nodes
        self.start_timeout_s = start_timeout_s
        self.processes: dict[str, subprocess.Popen] = {}
        self.started: list[Started] = []
        self.env = flower_env(self.work)  # FLWR_HOME = <work>/flwr-home: the `flwr` CLI's own
        self.link_port = 0

    # -- starting -----------------------------------------------------------------------------
    def __enter__(self) -> Deployment:
        _become_subreaper()
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        try:
            self.link_port = free_port()
            self._start(
                "superlink",
                [
                    "flower-superlink",
                    "--insecure",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.link_port),
                    "--disable-runtime-dependency-installation",
                ],
                self.link_port,
                self.env,
            )
            self._write_cli_config()
            for node in self.nodes:
                port = free_port()
                home = self.work / "nodes" / f"node-{node.partition}"
                home.mkdir(parents=True, exist_ok=True)
                node.store.parent.mkdir(parents=True, exist_ok=True)
                self._start(
                    f"supernode-{node.partition}",
                    [
                        "flower-supernode",
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{self.link_port}",
                        "--port",
                        str(port),
                        "--node-config",
                        node.node_config(len(self.nodes)),
                    ],
                    port,
                    self.env | {"FLWR_HOME": str(home / "flwr-home")},
                )
            self._write_state()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self, name: str, command: list[str], port: int, env: dict) -> None:
        log = self.work / "logs" / f"{name}.log"
        binary = str(Path(sys.executable).with_name(command[0]))
        with log.open("ab") as out:  # the child keeps its own descriptor
            process = subprocess.Popen(
                [binary, *command[1:]],
                env=env,
                cwd=self.work,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group
            )
        self.processes[name] = process
        self.started.append(Started(name, process.pid, port, str(log)))
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise DeploymentError(f"{name} exited with {process.returncode}; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        raise DeploymentError(f"{name} was not up after {self.start_timeout_s:.0f} s; see {log}")

    def _write_cli_config(self) -> None:
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.link_port}"\ninsecure = true\n'
        )

    def _write_state(self) -> None:
        state = {
            "superlink": f"127.0.0.1:{self.link_port}",
            "connection": CONNECTION,
            "flwr_home": self.env["FLWR_HOME"],
            "processes": [asdict(s) for s in self.started],
            "nodes": [{**asdict(n), "store": str(n.store)} for n in self.nodes],
        }
        (self.work / "deployment.json").write_text(json.dumps(state, indent=1))

    # -- running ------------------------------------------------------------------------------
    def _flwr(self, *args: str, timeout: float = 120) -> dict:
        done = subprocess.run(
            [str(Path(sys.executable).with_name("flwr")), *args, "--format", "json"],
            env=self.env,
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        try:
            return json.loads(done.stdout)
        except ValueError:
            raise DeploymentError(
                f"flwr {args[0]} failed ({done.returncode}): {(done.stdout + done.stderr)[-800:]}"
            ) from None

    def submit(self, config: dict[str, object]) -> int:
        """Start the app on the federation; returns the run ID."""
        reply = self._flwr("run", str(PROJECT), CONNECTION, "--run-config", run_config(config))
        if not reply.get("success"):
            raise DeploymentError(f"flwr run was refused: {reply}")
        return int(reply["run-id"])

    def wait(self, run_id: int, timeout_s: float, poll_s: float = 2.0) -> str:
        """Poll until the run finishes; returns its status (`finished:completed` on success)."""
        deadline = time.monotonic() + timeout_s
        status = "unknown"
        while time.monotonic() < deadline:
            runs = self._flwr("ls", CONNECTION, "--run-id", str(run_id)).get("runs", [])
            status = runs[0]["status"] if runs else status
            if status.startswith("finished"):
                return status
            if self.processes["superlink"].poll() is not None:
                raise DeploymentError(f"the SuperLink exited; see {self.work / 'logs'}")
            time.sleep(poll_s)
        with contextlib.suppress(DeploymentError, subprocess.TimeoutExpired):
            self._flwr("stop", str(run_id), CONNECTION)
        raise DeploymentError(f"run {run_id} still {status!r} after {timeout_s:.0f} s")

    # -- stopping -----------------------------------------------------------------------------
    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, grace_s: float = 10.0) -> None:
        """SuperNodes first (SIGTERM: they unregister), then the SuperLink, then a sweep."""
        nodes = [p for n, p in self.processes.items() if n != "superlink"]
        link = self.processes.get("superlink")
        for group in (nodes, [link] if link else []):
            for process in group:
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for process in group:
                try:
                    process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        self._sweep(grace_s)
        _reap_zombies()
        self.processes.clear()

    def _sweep(self, grace_s: float) -> None:
        """Whatever Flower process is still below us (e.g. the SuperLink's SuperExec, which
        runs in a session of its own): SIGTERM, then SIGKILL, and reap it."""
        deadline = time.monotonic() + grace_s
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = flower_descendants()
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            while left and time.monotonic() < deadline:
                for pid in list(left):
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)  # ours by subreaping: reap it
                    if not _alive(pid):
                        left.pop(pid)
                time.sleep(0.1)
            if not left:
                return
            deadline = time.monotonic() + 2


def deploy(
    *, nodes: list[NodeSpec], work: Path, config: dict[str, object], timeout_s: float
) -> tuple[int, str]:
    """Start a deployment, run the app once on it, stop everything; returns the run's ID and
    status."""
    with Deployment(work, nodes) as deployment:
        run_id = deployment.submit(config)
        print(
            f"run {run_id} submitted to the SuperLink at 127.0.0.1:{deployment.link_port} "
            f"with {len(nodes)} SuperNodes; logs in {work / 'logs'}",
            flush=True,
        )
        status = deployment.wait(run_id, timeout_s)
        print(f"run {run_id}: {status}", flush=True)
        return run_id, status
