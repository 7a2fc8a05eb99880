"""`spa federate`: one command for a federated run, with everything it starts stopped.

Starts the cloud API once (`spa cloud`, a real uvicorn server) for every device, sets the safe
Flower environment (no runtime dependency re-install, no telemetry or update checks, a run-local
FLWR_HOME), then either runs `flwr run <project> --stream` on the simulation engine — on a local
SuperLink of its own (free ports, not Flower's fixed 39091/39093, which a second run on the same
machine would share and the first would stop under it) — and stops that SuperLink, or
(`deployment=True`) starts a SuperLink and one SuperNode per device as separate processes
(`app.federation.deployment`); then it stops the cloud.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import psutil

from app.cloud_process import cloud, free_port
from app.federation.env import PROJECT, flower_env, run_config


def superlinks(port: int) -> set[int]:
    """PIDs of the running `flower-superlink` processes serving `port`."""
    pids = set()
    for process in psutil.process_iter(["cmdline"]):
        argv = process.info["cmdline"] or []
        if any(a.endswith("flower-superlink") for a in argv) and str(port) in argv:
            pids.add(process.pid)
    return pids


def stop(pid: int, grace_s: float = 15.0) -> None:
    """SIGTERM a process that is not our child, wait for it to go, SIGKILL if it lingers."""
    with contextlib.suppress(psutil.NoSuchProcess):
        process = psutil.Process(pid)
        process.terminate()
        try:
            process.wait(grace_s)
        except psutil.TimeoutExpired:
            process.kill()


def _deploy(config: dict[str, object], nodes: int, data: Path, work: Path) -> int:
    from app.federation.deployment import NodeSpec, deploy
    from device_agent.federated import user_of

    specs = [NodeSpec(i, user_of(data, i), work / "devices" / f"device-{i}") for i in range(nodes)]
    rounds, timeout = int(config["num-rounds"]), float(config.get("round-timeout", 3600))
    run_id, status = deploy(
        nodes=specs, work=work, config=config, timeout_s=rounds * 2 * timeout + 300
    )
    name = config.get("run-name") or f"{config['strategy']}-{run_id}"  # as the ServerApp's
    summary = work / f"{name}.md"
    if summary.is_file():
        print(summary.read_text())
    return 0 if status == "finished:completed" else 1


def federate(
    *,
    strategy: str,
    nodes: int,
    rounds: int,
    data: Path,
    work: Path,
    backbone: str,
    cloud_url: str | None = None,
    extra: dict[str, object] | None = None,
    cpus_per_node: int = 1,
    deployment: bool = False,
    catalogue: Path | None = None,
) -> int:
    """Run the app once; returns 0 when the run completed. Output streams to the terminal."""
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        url = cloud_url or stack.enter_context(cloud(backbone, work, catalogue=catalogue))
        config = {
            "cloud-url": url,
            "work-dir": str(work),
            "data": str(Path(data).resolve()),
            "strategy": strategy,
            "num-rounds": rounds,
            "num-nodes": nodes,
            "min-nodes": max(1, nodes - 1),
            **(extra or {}),
        }
        if deployment:
            return _deploy(config, nodes, data, work)
        command = [
            str(Path(sys.executable).with_name("flwr")),
            "run",
            str(PROJECT),
            "--stream",
            "--run-config",
            run_config(config),
            "--federation-config",
            f"num-supernodes={nodes} client-resources-num-cpus={cpus_per_node}",
        ]
        link, control = free_port(), free_port()  # `flwr run` starts its local SuperLink there
        env = flower_env(work) | {
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(link),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control),
        }
        try:
            return subprocess.run(command, env=env, cwd=PROJECT).returncode
        finally:
            for pid in superlinks(link):  # the SuperLink `flwr run` left running
                stop(pid)
