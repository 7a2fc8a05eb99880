"""The federated simulation through the real Flower simulation engine (`flwr run`, Ray), three
tiny-backbone devices, two rounds, against one real cloud server: per strategy, what leaves a
device and what the devices end up sharing; a failing device does not stop the run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cloud_server import running

from app.federation.deployment import FLOWER_PROGRAMS
from app.federation.launch import federate
from app.federation.records import Records
from benchmarks.bare_device import device


def _users(path: Path) -> Path:
    """Three PersonaChat-style users, each with a habit of their own (and 6 replies)."""
    habits = ("I love hiking.", "Cats are the best.", "Coffee first, always.")
    rows = [
        {
            "user_id": f"u{i}",
            "persona": [habit],
            "turns": [
                {"partner": f"What about topic {t}?", "reply": f"{habit} Topic {t}."}
                for t in range(6)
            ],
        }
        for i, habit in enumerate(habits)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def flower_processes_of(work: Path, grace_s: float = 15.0) -> list[int]:
    """Flower processes (anywhere) whose environment points into `work` (a run's FLWR_HOME),
    given `grace_s` to finish exiting (a stopped SuperLink's children go a moment after it)."""
    deadline = time.monotonic() + grace_s
    while (found := _flower_processes_of(work)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def _flower_processes_of(work: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            environ = (entry / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if (
            any(p in cmdline for p in (*FLOWER_PROGRAMS, "flwr-simulation"))
            and str(work) in environ
        ):
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """fedper, local with partition 2 failing, and fedavg-ft training a sampled fraction: 3
    devices × 2 rounds each. (Plain fedavg runs in the Beauty test below and in
    test_federated_deployment.py; fedavg-ft averages exactly as it does.)"""
    data = _users(tmp_path_factory.mktemp("data") / "personachat.jsonl")
    codes = {}
    with running(tmp_path_factory.mktemp("cloud")) as server:
        work = tmp_path_factory.mktemp("federated")
        for strategy, extra in (
            ("fedper", {}),
            ("local", {"fail-partition": 2}),
            ("fedavg-ft", {"fraction-train": 0.5}),  # 2 of 3 devices train each round
        ):
            codes[strategy] = federate(
                strategy=strategy,
                nodes=3,
                rounds=2,
                data=data,
                work=work / strategy,
                backbone="tiny-llama",
                cloud_url=server.url,
                extra={"run-name": strategy, "local-epochs": 2, "eval-tokens": 8, **extra},
            )
    assert flower_processes_of(work) == []  # the launcher stopped the SuperLink it started
    return work, codes


def _nodes(work: Path, strategy: str, phase: str) -> dict[int, dict[str, dict]]:
    """round → node → metrics, from the run's database."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from app.federation.records import RoundMetric

    records = Records(f"sqlite:///{work / strategy / 'federated.db'}")
    with Session(records.engine) as s:
        rows = s.scalars(select(RoundMetric).where(RoundMetric.phase == phase))
        out: dict[int, dict[str, dict]] = {}
        for r in rows:
            out.setdefault(r.round, {})[r.node] = r.metrics
    return out


@pytest.mark.parametrize("strategy", ["fedper", "local", "fedavg-ft"])
def test_every_round_has_metrics_from_the_devices(runs, strategy):
    work, codes = runs
    assert codes[strategy] == 0
    for phase in ("train", "evaluate"):
        # local's partition 2 fails; fedavg-ft trains a sample of 2 and evaluates all 3
        expected_nodes = (
            2 if strategy == "local" or (strategy, phase) == ("fedavg-ft", "train") else 3
        )
        rounds = _nodes(work, strategy, phase)
        assert sorted(rounds) == [1, 2]
        for per_node in rounds.values():
            assert "all" in per_node  # the aggregate
            devices = {n: m for n, m in per_node.items() if n != "all"}
            assert len(devices) == expected_nodes
            key = "train-loss" if phase == "train" else "rouge-l"
            assert all(key in m for m in devices.values())
    assert (work / strategy / f"{strategy}.png").stat().st_size > 1000
    assert "| 2 |" in (work / strategy / f"{strategy}.md").read_text()


def test_local_never_transmits_side_network_parameters(runs):
    work, _ = runs
    for per_node in _nodes(work, "local", "train").values():
        for node, m in per_node.items():
            assert m["bytes-to-server"] == 0, node
    for per_node in _nodes(work, "local", "evaluate").values():
        assert all(m["shared-hash"] == 0 for n, m in per_node.items() if n != "all")


def test_averaging_makes_the_devices_weights_identical(runs):
    work, _ = runs  # fedavg-ft: the average every device received, before it fine-tunes
    for per_node in _nodes(work, "fedavg-ft", "evaluate").values():
        devices = [m for n, m in per_node.items() if n != "all"]
        assert len({m["shared-hash"] for m in devices}) == 1 and devices[0]["shared-hash"] != 0
        assert all(m["personal-hash"] == 0 for m in devices)  # everything is shared
    trained = _nodes(work, "fedavg-ft", "train")
    assert all(m["bytes-to-server"] > 0 for n, m in trained[1].items() if n != "all")


def test_fedper_shares_the_body_and_keeps_personal_layers_different(runs):
    work, _ = runs
    for per_node in _nodes(work, "fedper", "evaluate").values():
        devices = [m for n, m in per_node.items() if n != "all"]
        assert len({m["shared-hash"] for m in devices}) == 1
        assert len({m["personal-hash"] for m in devices}) == 3  # gate and output layers differ
    whole = _nodes(work, "fedavg-ft", "train")[1]  # sends what fedavg sends: everything
    fedper = _nodes(work, "fedper", "train")[1]
    sent = {
        s: max(m["bytes-to-server"] for n, m in r.items() if n != "all")
        for s, r in (("whole", whole), ("fedper", fedper))
    }
    assert 0 < sent["fedper"] < sent["whole"]


def test_fedavg_ft_evaluates_the_average_fine_tuned_on_each_device(runs):
    from device_agent.agent import DeviceAgent

    work, _ = runs
    for partition in range(3):  # one fine-tuning run per evaluation, besides its training runs
        with DeviceAgent(work / "fedavg-ft" / "devices" / f"device-{partition}") as agent:
            runs_done = len(agent.store.checkpoints())
        trained = sum(
            any(int(m["partition-id"]) == partition for n, m in per_node.items() if n != "all")
            for per_node in _nodes(work, "fedavg-ft", "train").values()
        )
        assert runs_done == trained + 2, partition


def test_a_failing_device_is_recorded_and_does_not_stop_the_run(runs):
    work, codes = runs
    assert codes["local"] == 0
    failures = Records(f"sqlite:///{work / 'local' / 'federated.db'}").failures("local")
    assert {(f.round, f.phase) for f in failures} == {
        (1, "train"),
        (1, "evaluate"),
        (2, "train"),
        (2, "evaluate"),
    }
    assert all("injected failure on partition 2" in f.reason for f in failures)
    assert "| 1 |" in (work / "local" / "local.md").read_text()


def test_beauty_devices_are_scored_by_recall_against_the_clouds_recommender(tmp_path):
    """Beauty as a federated task: each device's side network scores the cloud's catalogue
    search for its held-out purchases, beside the cloud's own recommender on the same ones — in
    the last round only (`search-rounds`) — and every round the held-out purchase's loss per
    code token under the device's model and under the backbone alone. Devices train their side
    networks on their purchases as the cloud's item codes."""
    from test_recommend import TITLES, _walks, tiny_target

    catalogue = tmp_path / "items.json"
    catalogue.write_text(json.dumps(TITLES))
    data = tmp_path / "beauty.jsonl"
    target = tiny_target(tmp_path, _walks(12, 4))
    with running(tmp_path / "cloud", catalogue=catalogue, recommend_target=str(target)) as server:
        with device(server.url) as client:  # the held-out purchase: the cloud's own top item
            rows = []
            for i in range(3):
                history = TITLES[i : i + 5]
                top = client.http.post("/v1/recommendations", json={"history": history, "k": 5})
                held = top.json()["items"][0]["title"]
                rows.append(
                    {"user_id": f"b{i}", "history": history, "valid": [held], "test": [TITLES[-1]]}
                )
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        code = federate(
            strategy="fedavg",
            nodes=3,
            rounds=2,
            data=data,
            work=tmp_path / "work",
            backbone="tiny-llama",
            cloud_url=server.url,
            extra={
                "run-name": "beauty",
                "setting": "lst",
                "local-epochs": 1,
                "held-out": 1,
                "eval-k": 5,
                "search-rounds": "last",
            },
        )
    assert code == 0
    rounds = _nodes(tmp_path, "work", "evaluate")
    first, last = (
        {int(m["partition-id"]): m for n, m in rounds[r].items() if n != "all"} for r in (1, 2)
    )
    assert sorted(first) == sorted(last) == [0, 1, 2]
    for m in first.values():  # no search before the last round
        assert "recall@5" not in m and "recall@5-cloud" not in m
    for m in last.values():  # the device asked the cloud for the same history: a hit at 1
        assert m["recall@5-cloud"] == 1.0 and m["ndcg@5-cloud"] == 1.0
        assert 0.0 <= m["ndcg@5"] <= m["recall@5"] <= 1.0
    for p in first:  # the backbone is frozen; the device's model moves with training
        assert first[p]["item-nll-backbone"] == pytest.approx(last[p]["item-nll-backbone"])
        assert first[p]["item-nll-backbone"] > 0 and last[p]["item-nll"] > 0
        assert last[p]["item-nll"] != pytest.approx(last[p]["item-nll-backbone"])
    assert "recall@5" in rounds[2]["all"] and "item-nll" in rounds[1]["all"]
