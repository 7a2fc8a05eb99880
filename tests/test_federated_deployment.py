"""The same federated app under Flower's deployment runtime: a SuperLink and three SuperNodes as
real processes (`spa federate --deployment`), tiny-backbone devices, two rounds, one real cloud.
One run is whole; in the other a SuperNode is killed (SIGKILL, its whole process group) in the
middle of round 1 — the rounds complete with the other two, the failure is recorded against
that node, the run finishes, and no Flower process is left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cloud_server import running
from test_federated import _users, flower_processes_of

from app.federation.records import Records, RoundMetric

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _federate(work: Path, data: Path, url: str, strategy: str) -> subprocess.Popen:
    command = [sys.executable, "-c", "from app.cli import main; main()", "federate",
               "--deployment", "--strategy", strategy, "--users", "3", "--rounds", "2",
               "--data", str(data), "--work-dir", str(work), "--backbone", "tiny-llama",
               "--cloud-url", url, "--run-name", strategy, "--local-epochs", "1"]  # fmt: skip
    log = (work.parent / f"{work.name}.log").open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def _kill_node_when_training(work: Path, partition: int, process: subprocess.Popen) -> float:
    """SIGKILL SuperNode `partition`'s process group once its device has started training."""
    store = work / "devices" / f"device-{partition}" / "checkpoints"
    deadline = time.monotonic() + 600
    while not store.is_dir():
        assert process.poll() is None and time.monotonic() < deadline, "round 1 never started"
        time.sleep(0.2)
    state = json.loads((work / "deployment.json").read_text())
    pid = next(p["pid"] for p in state["processes"] if p["name"] == f"supernode-{partition}")
    os.killpg(pid, signal.SIGKILL)
    return time.monotonic()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> dict[str, Path]:
    data = _users(tmp_path_factory.mktemp("data") / "personachat.jsonl")
    root = tmp_path_factory.mktemp("deployment")
    works = {"fedavg": root / "fedavg", "killed": root / "killed"}
    with running(tmp_path_factory.mktemp("cloud")) as server:
        whole = _federate(works["fedavg"], data, server.url, "fedavg")
        assert whole.wait(timeout=600) == 0, (root / "fedavg.log").read_text()[-3000:]
        killed = _federate(works["killed"], data, server.url, "fedavg")
        _kill_node_when_training(works["killed"], 2, killed)
        assert killed.wait(timeout=600) == 0, (root / "killed.log").read_text()[-3000:]
    return works


def _rounds(work: Path, phase: str) -> dict[int, dict[str, dict]]:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    records = Records(f"sqlite:///{work / 'federated.db'}")
    out: dict[int, dict[str, dict]] = {}
    with Session(records.engine) as s:
        for r in s.scalars(select(RoundMetric).where(RoundMetric.phase == phase)):
            out.setdefault(r.round, {})[r.node] = r.metrics
    return out


def test_each_supernode_is_its_own_process_with_its_own_user_and_store(deployed):
    state = json.loads((deployed["fedavg"] / "deployment.json").read_text())
    names = [p["name"] for p in state["processes"]]
    assert names == ["superlink", "supernode-0", "supernode-1", "supernode-2"]
    assert len({p["pid"] for p in state["processes"]}) == 4
    assert len({p["port"] for p in state["processes"]}) == 4
    assert [n["user"] for n in state["nodes"]] == ["u0", "u1", "u2"]
    for node in state["nodes"]:
        assert (Path(node["store"]) / "checkpoints").is_dir()  # the device's own private store


def test_every_round_has_metrics_from_every_supernode_and_fedavg_agrees(deployed):
    work = deployed["fedavg"]
    for phase in ("train", "evaluate"):
        rounds = _rounds(work, phase)
        assert sorted(rounds) == [1, 2]
        for per_node in rounds.values():
            devices = {n: m for n, m in per_node.items() if n != "all"}
            assert "all" in per_node and len(devices) == 3
            assert sorted(m["partition-id"] for m in devices.values()) == [0, 1, 2]
            if phase == "evaluate":
                assert per_node["all"]["round-seconds"] > 0  # the round's wall time
    for per_node in _rounds(work, "evaluate").values():
        hashes = {m["shared-hash"] for n, m in per_node.items() if n != "all"}
        assert len(hashes) == 1 and hashes != {0}
    assert all(m["bytes-to-server"] > 0 for n, m in _rounds(work, "train")[1].items() if n != "all")
    assert Records(f"sqlite:///{work / 'federated.db'}").failures("fedavg") == []
    assert "| 2 |" in (work / "fedavg.md").read_text()


def test_a_killed_supernode_is_a_recorded_failure_and_the_run_completes(deployed):
    work = deployed["killed"]
    failures = Records(f"sqlite:///{work / 'federated.db'}").failures("fedavg")
    assert failures and {f.round for f in failures} == {1}
    train = _rounds(work, "train")
    killed_node = {n for n, m in train.get(1, {}).items() if m.get("partition-id") == 2}
    assert not killed_node  # node 2 never answered round 1's training
    reporting = {n for per_node in train.values() for n in per_node if n != "all"}
    assert len({f.node for f in failures}) == 1  # node 2's ID (not the SuperLink's "1")
    assert {f.node for f in failures}.isdisjoint(reporting | {"1"})
    for phase in ("train", "evaluate"):
        rounds = _rounds(work, phase)
        assert sorted(rounds) == [1, 2]
        for per_node in rounds.values():
            devices = {n: m for n, m in per_node.items() if n != "all"}
            assert sorted(m["partition-id"] for m in devices.values()) == [0, 1]
    assert "| 2 |" in (work / "fedavg.md").read_text()


def test_no_flower_process_is_left_behind(deployed):
    for work in deployed.values():
        assert flower_processes_of(work) == []
