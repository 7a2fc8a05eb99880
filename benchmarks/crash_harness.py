"""Crash safety at scale: SIGKILL a writer at random moments, reopen every store, check it.

    python benchmarks/crash_harness.py [--kills 100] [--seed 0] [--cloud-every 10]

Each round starts a worker process that writes in a loop — history imports (batches of 20
items in one transaction), checkpoints (an atomic safetensors file, then its record), or
generation logs — on one device store, prints a tag after every completed write, and is killed
with SIGKILL after a random 0.2–2.5 s. Every `--cloud-every`-th round instead kills the cloud
(`spa cloud`, tiny backbone, SQLite) while devices stream sessions through it, and restarts it
on the same database. After every kill: the database passes SQLite's integrity check and
reopens; every write reported complete is there; no half record (an import batch is all there or
not at all; every checkpoint record's file loads); the restarted cloud is ready and leaves no
session live. Writes `benchmarks/results/crash_harness.json`.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "crash_harness.json"
BATCH = 20
DEVICE_OPS = ("import", "checkpoint", "log")


# ---- workers (run in their own process, killed mid-write) ----------------------------------------
def worker(op: str, directory: Path) -> None:
    from device_agent.store import Store

    store, n = Store(directory), 0
    if op == "checkpoint":
        from personalization.backbone.tiny import tiny_backbone
        from personalization.config import SPAConfig
        from personalization.model import SPAModel
        from personalization.training.checkpoint import describe, save_checkpoint

        model = SPAModel(tiny_backbone("llama"), SPAConfig(setting="spa"))
    print("ready", flush=True)
    while True:
        tag = f"{op}-{time.time_ns()}-{n}"
        if op == "import":
            store.add_items(
                [{"kind": "text", "instruction": tag, "output": f"{tag}/{i}"} for i in range(BATCH)]
            )
        elif op == "log":
            store.log_generation(setting="base", prompt=tag, status="finished", text="x" * 2000)
        else:
            relative = f"checkpoints/{tag}.safetensors"
            save_checkpoint(store.path(relative), model, describe(model, epoch=n))
            run = store.start_run("spa", {"tag": tag})
            store.add_checkpoint(
                run.id,
                path=relative,
                setting="spa",
                epoch=n,
                parameters=1,
                parameters_pct=0.1,
                sha256="0" * 64,
                bytes=1,
            )
        print(f"done {tag}", flush=True)
        n += 1


# ---- the harness ---------------------------------------------------------------------------------
def integrity(database: Path) -> str:
    with sqlite3.connect(database) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def check_device(directory: Path, completed: set[str]) -> list[str]:
    """What is wrong with the device store after a kill (empty: nothing)."""
    from device_agent.store import Store
    from personalization.training.checkpoint import read_checkpoint

    problems = []
    if (status := integrity(directory / "device.db")) != "ok":
        problems.append(f"integrity_check: {status}")
    store = Store(directory)  # reopens, or raises
    items = Counter(item.instruction for item in store.items())
    half = {tag: n for tag, n in items.items() if n != BATCH}
    if half:
        problems.append(f"half-written import batches: {half}")
    logs = {g.prompt for g in store.generations(limit=10**6)}
    checkpoints = {}
    for row in store.checkpoints():
        checkpoints[Path(row.path).stem] = row
        try:
            read_checkpoint(store.path(row.path))
        except Exception as exc:  # noqa: BLE001 (any failure to load is what we look for)
            problems.append(f"checkpoint {row.path} does not load: {exc}")
    present = set(items) | logs | set(checkpoints)
    lost = {tag for tag in completed if tag not in present}
    if lost:
        problems.append(f"completed writes lost: {sorted(lost)[:5]}")
    store.engine.dispose()
    return problems


def device_round(op: str, directory: Path, rng: random.Random, completed: set[str]) -> dict:
    process = subprocess.Popen(
        [sys.executable, __file__, "--worker", op, "--dir", str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    first = process.stdout.readline().strip()
    if first != "ready":
        raise RuntimeError(f"worker {op} did not start: {first}{process.stdout.read()}")
    time.sleep(rng.uniform(0.2, 2.5))
    process.send_signal(signal.SIGKILL)
    output = process.communicate()[0]
    done = [line.split(" ", 1)[1] for line in output.splitlines() if line.startswith("done ")]
    completed.update(done)
    return {"op": op, "writes_completed": len(done), "problems": check_device(directory, completed)}


def cloud_round(directory: Path, rng: random.Random, finished: set[str]) -> dict:
    """Kill the cloud while devices stream sessions; restart it on the same database."""
    import httpx

    from benchmarks.servers import free_port, spawn, stop, wait_ready

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cloud = spawn(directory, port)
    wait_ready(cloud, url)
    token = httpx.post(f"{url}/v1/devices", json={"name": "crash"}).json()["token"]
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + rng.uniform(0.5, 3.0)
    body = {"prompt": "crash test", "setting": "base", "decoding": {"max_new_tokens": 16}}
    try:
        while time.monotonic() < deadline:
            sid = httpx.post(f"{url}/v1/sessions", json=body, headers=headers).json()["session_id"]
            with httpx.stream("GET", f"{url}/v1/sessions/{sid}/events", headers=headers) as s:
                last = [line for line in s.iter_lines() if line][-1]
            if json.loads(last)["event"] == "done":
                finished.add(sid)
    except httpx.HTTPError:
        pass  # only if the cloud went away early
    cloud.send_signal(signal.SIGKILL)
    cloud.wait()
    problems = []
    if (status := integrity(directory / "cloud.db")) != "ok":
        problems.append(f"integrity_check: {status}")
    restarted = spawn(directory, port)
    try:
        wait_ready(restarted, url)
        with sqlite3.connect(directory / "cloud.db") as db:
            rows = dict(db.execute("SELECT id, status FROM sessions").fetchall())
        lost = {sid for sid in finished if rows.get(sid) != "finished"}
        live = {sid for sid, status in rows.items() if status in ("created", "running")}
        if lost:
            problems.append(f"finished sessions lost: {sorted(lost)[:5]}")
        if live:
            problems.append(f"sessions left live after the restart: {sorted(live)[:5]}")
    finally:
        stop(restarted)
    return {"op": "cloud", "writes_completed": len(finished), "problems": problems}


def main() -> None:
    parser = harness.parser(__doc__, data=False, backbone=False)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cloud-every", type=int, default=10, help="every N-th kill: the cloud")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results file")
    parser.add_argument("--worker", choices=DEVICE_OPS, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.dir)
        return
    from tqdm import tqdm

    from device_agent.store import Store

    rng = random.Random(args.seed)
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as work:
        device, cloud = Path(work) / "device", Path(work) / "cloud"
        Store.create(device, {"name": "crash"}).engine.dispose()
        cloud.mkdir()
        completed: set[str] = set()
        finished: set[str] = set()
        for k in tqdm(range(args.kills), desc="kills", unit="kill"):
            if args.cloud_every and k % args.cloud_every == args.cloud_every - 1:
                rounds.append(cloud_round(cloud, rng, finished))
            else:
                rounds.append(device_round(rng.choice(DEVICE_OPS), device, rng, completed))
            if rounds[-1]["problems"]:
                tqdm.write(f"kill {k} ({rounds[-1]['op']}): {rounds[-1]['problems']}")
    by_op = Counter(r["op"] for r in rounds)
    results = {
        "config": {"kills": args.kills, "seed": args.seed, "cloud_every": args.cloud_every},
        "kills": len(rounds),
        "kills_by_op": dict(by_op),
        "writes_completed": sum(r["writes_completed"] for r in rounds if r["op"] != "cloud"),
        "sessions_finished": max(
            (r["writes_completed"] for r in rounds if r["op"] == "cloud"), default=0
        ),
        "corrupted_or_lost": sum(bool(r["problems"]) for r in rounds),
        "problems": [r for r in rounds if r["problems"]],
    }
    write_results(results, args.out)
    print(json.dumps({k: v for k, v in results.items() if k != "problems"}, indent=2))


if __name__ == "__main__":
    main()
