"""The same federated app under Flower's deployment runtime: a SuperLink and three SuperNodes as
real processes (`spa federate --deployment`), tiny-backbone devices, one real cloud, three rounds
of fedavg. Rounds 1 and 2 are whole; in the middle of round 3 a SuperNode is killed (SIGKILL, its
whole process group): the round completes with the other two, the failure is recorded against
that node, the run finishes, and no Flower process is left behind. (One run rather than a whole
one and a killed one: a run costs minutes here, most of it processes starting.)"""

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
from test_federated import _nodes, _users, flower_processes_of

from app.federation.records import Records

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

KILLED, ROUNDS = 2, 3  # SuperNode 2 dies in the last round


def _federate(work: Path, data: Path, url: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-c",
        "from app.cli import main; main()",
        "federate",
        "--deployment",
        "--strategy",
        "fedavg",
        "--users",
        "3",
        "--rounds",
        str(ROUNDS),
        "--data",
        str(data),
        "--work-dir",
        str(work),
        "--backbone",
        "tiny-llama",
        "--cloud-url",
        url,
        "--run-name",
        "fedavg",
        "--local-epochs",
        "1",
    ]
    log = (work.parent / f"{work.name}.log").open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def _kill_node_in_round(work: Path, partition: int, rnd: int, process: subprocess.Popen) -> None:
    """SIGKILL SuperNode `partition`'s process group once round `rnd`'s training reached it."""
    log = work / "logs" / f"supernode-{partition}.log"
    deadline = time.monotonic() + 600

    def trainings() -> int:
        return log.read_text(errors="replace").count("Receiving: train message")

    while not (log.is_file() and trainings() >= rnd):
        assert process.poll() is None and time.monotonic() < deadline, f"round {rnd} never came"
        time.sleep(0.2)
    state = json.loads((work / "deployment.json").read_text())
    pid = next(p["pid"] for p in state["processes"] if p["name"] == f"supernode-{partition}")
    os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> Path:
    data = _users(tmp_path_factory.mktemp("data") / "personachat.jsonl")
    work = tmp_path_factory.mktemp("deployment") / "fedavg"
    with running(tmp_path_factory.mktemp("cloud")) as server:
        run = _federate(work, data, server.url)
        _kill_node_in_round(work, KILLED, ROUNDS, run)
        assert run.wait(timeout=600) == 0, (work.parent / "fedavg.log").read_text()[-3000:]
    return work


def _rounds(work: Path, phase: str) -> dict[int, dict[str, dict]]:
    return _nodes(work.parent, work.name, phase)  # the run's work dir is <root>/<run name>


def _partitions(per_node: dict[str, dict]) -> list[int]:
    return sorted(int(m["partition-id"]) for n, m in per_node.items() if n != "all")


def test_each_supernode_is_its_own_process_with_its_own_user_and_store(deployed):
    state = json.loads((deployed / "deployment.json").read_text())
    names = [p["name"] for p in state["processes"]]
    assert names == ["superlink", "supernode-0", "supernode-1", "supernode-2"]
    assert len({p["pid"] for p in state["processes"]}) == 4
    assert len({p["port"] for p in state["processes"]}) == 4
    assert [n["user"] for n in state["nodes"]] == ["u0", "u1", "u2"]
    for node in state["nodes"]:
        assert (Path(node["store"]) / "checkpoints").is_dir()  # the device's own private store


def test_whole_rounds_have_metrics_from_every_supernode_and_fedavg_agrees(deployed):
    for phase in ("train", "evaluate"):
        rounds = _rounds(deployed, phase)
        assert sorted(rounds) == list(range(1, ROUNDS + 1))
        for rnd in range(1, ROUNDS):  # before the kill
            assert "all" in rounds[rnd] and _partitions(rounds[rnd]) == [0, 1, 2]
            if phase == "evaluate":
                assert rounds[rnd]["all"]["round-seconds"] > 0  # the round's wall time
    evaluated = _rounds(deployed, "evaluate")
    for rnd in range(1, ROUNDS):
        hashes = {m["shared-hash"] for n, m in evaluated[rnd].items() if n != "all"}
        assert len(hashes) == 1 and hashes != {0}
    trained = _rounds(deployed, "train")[1]
    assert all(m["bytes-to-server"] > 0 for n, m in trained.items() if n != "all")
    failures = Records(f"sqlite:///{deployed / 'federated.db'}").failures("fedavg")
    assert {f.round for f in failures} == {ROUNDS}  # none before the kill


def test_a_killed_supernode_is_a_recorded_failure_and_the_run_completes(deployed):
    failures = Records(f"sqlite:///{deployed / 'federated.db'}").failures("fedavg")
    assert failures and {f.round for f in failures} == {ROUNDS}
    # recorded against the killed node's own ID (not the SuperLink's "1"), the one that answered
    # as partition 2 before
    first = _rounds(deployed, "train")[1]
    killed = {n for n, m in first.items() if n != "all" and int(m["partition-id"]) == KILLED}
    assert {f.node for f in failures} == killed
    for phase in ("train", "evaluate"):
        last = _rounds(deployed, phase)[ROUNDS]
        assert "all" in last and _partitions(last) == [0, 1]  # completed with the other two
    assert f"| {ROUNDS} |" in (deployed / "fedavg.md").read_text()


def test_no_flower_process_is_left_behind(deployed):
    assert flower_processes_of(deployed) == []
