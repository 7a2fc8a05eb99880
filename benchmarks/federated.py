"""Federated experiments large enough to show a difference (issue 21): every strategy × round with
the task's metric and its bootstrap 95 % interval over devices, `base` beside it, bytes each
device sent to the cloud and to the server, the round's wall time, failures.

    python benchmarks/federated.py run --task beauty       [--devices 64] [--rounds 5]
        [--fraction 0.25] [--strategies local fedavg fedper fedavg-ft] [--backbone smollm2]
    python benchmarks/federated.py run --task personachat  [--devices 32] ...
    python benchmarks/federated.py table

- beauty: each device is one of the recommendation target's held-out test users (never trained
  on centrally: `personalization.atspeed.target.TargetConfig`'s split), holding its purchases
  but the last, which it is scored on: Recall / NDCG @ 10 of its side network on the cloud's
  catalogue search. `base` is the cloud's own recommender on the same item — the centrally
  trained target where `spa train-target` has run (else the zero-shot backbone; the JSON says
  which).
- personachat: each device is one user (persona sentences as free text, then replies), scored
  on its last two replies by Rouge-L; `base` is the backbone alone.

Each strategy is one `spa federate` run (the simulation engine, its own cloud) under
.bench/federated/<task>/<strategy>; a finished run is not run again. Figures go to
benchmarks/results/federated.json, and `table` prints the Markdown tables from it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _hardware import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks/results/federated.json"
STRATEGIES = ("local", "fedavg", "fedper", "fedavg-ft")
TASKS = {  # metric, base metric, held-out items per device
    "beauty": ("recall@10", "recall@10-cloud", 1),
    "personachat": ("rouge-l", "rouge-l-base", 2),
}


def _users(args, work: Path) -> Path:
    """The devices' users as a data file: node i = its i-th row."""
    from personalization.atspeed.target import TargetConfig
    from personalization.training.data import read_jsonl

    name = "beauty.jsonl" if args.task == "beauty" else "personachat.jsonl"
    rows = list(read_jsonl(args.data / name))
    if args.task == "beauty":  # the target's held-out test users, in its split's order
        cfg = TargetConfig()
        random.Random(cfg.seed).shuffle(rows)
        rows = rows[: cfg.test_users]
    out = work / name
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[: args.devices]))
    return out


def run(args) -> None:
    from app.federation.launch import federate

    work = Path(args.work) / args.task
    work.mkdir(parents=True, exist_ok=True)
    data = _users(args, work)
    _, _, held_out = TASKS[args.task]
    for strategy in args.strategies:
        out = work / strategy
        if (out / f"{strategy}.md").is_file():
            print(f"{args.task}/{strategy}: done already", flush=True)
            continue
        t0 = time.perf_counter()
        code = federate(
            strategy=strategy, nodes=args.devices, rounds=args.rounds, data=data, work=out,
            backbone=args.backbone,
            catalogue=args.data / "beauty_items.json" if args.task == "beauty" else None,
            extra={"run-name": strategy, "local-epochs": args.local_epochs,
                   "held-out": held_out, "fraction-train": args.fraction,
                   "min-nodes": max(1, round(args.devices * args.fraction) - 1)},
        )  # fmt: skip
        print(f"{args.task}/{strategy}: exit {code} in {time.perf_counter() - t0:.0f} s",
              flush=True)  # fmt: skip
    summarise(args)


def _per_round(db: Path, strategy: str) -> dict[int, dict]:
    from app.federation.records import Records

    records = Records(f"sqlite:///{db}")
    rounds: dict[int, dict] = {}
    for m in records.metrics(strategy, node=None):
        entry = rounds.setdefault(m.round, {"train": [], "evaluate": [], "all": {}})
        if m.node == "all":
            entry["all"] |= m.metrics
        else:
            entry[m.phase].append(m.metrics)
    for f in records.failures(strategy):
        rounds.setdefault(f.round, {"train": [], "evaluate": [], "all": {}})
        rounds[f.round].setdefault("failures", []).append(f"{f.phase}: {f.reason[-120:]}")
    return rounds


def summarise(args) -> None:
    from personalization.training.evaluate import bootstrap_interval

    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"tasks": {}}
    metric, base, _ = TASKS[args.task]
    work = Path(args.work) / args.task
    rows = []
    for strategy in STRATEGIES:
        db = work / strategy / "federated.db"
        if not (work / strategy / f"{strategy}.md").is_file():
            continue
        for rnd, r in sorted(_per_round(db, strategy).items()):
            scores = [m[metric] for m in r["evaluate"] if metric in m]
            bases = [m[base] for m in r["evaluate"] if base in m]
            sent = r["train"]
            rows.append({
                "strategy": strategy, "round": rnd, "devices": len(scores),
                metric: _mean(scores), f"{metric}_ci": bootstrap_interval(scores),
                base: _mean(bases), f"{base}_ci": bootstrap_interval(bases),
                "trained": len(sent),
                "bytes_to_cloud": sum(m["bytes-to-cloud"] for m in sent) / max(len(sent), 1),
                "bytes_to_server": sum(m["bytes-to-server"] for m in sent) / max(len(sent), 1),
                "seconds": r["all"].get("round-seconds"), "failures": r.get("failures", []),
            })  # fmt: skip
    results["tasks"][args.task] = {
        "rows": rows, "metric": metric, "base": base,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }  # fmt: skip
    write_results(results, args.out)
    table(args.out)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def table(path: Path) -> None:
    r = json.loads(Path(path).read_text())
    print(f"Hardware: {r['hardware']}; {r['date']}")
    for task, t in r["tasks"].items():
        metric, base = t["metric"], t["base"]
        c = t["config"]
        print(f"\n{task}: {c['devices']} devices, {c['rounds']} rounds, {c['fraction']} of them "
              f"trained per round, {c['local_epochs']} local epochs, "
              f"{c['backbone']}\n")  # fmt: skip
        print(f"| strategy | round | {metric} | base ({base}) | devices trained | bytes to cloud "
              "/ device | bytes to server / device | round s | failures |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        for row in t["rows"]:
            m, b = row[f"{metric}_ci"], row[f"{base}_ci"]
            seconds = f"{row['seconds']:.0f}" if row["seconds"] is not None else "–"
            print(f"| {row['strategy']} | {row['round']} | {row[metric]:.3f} [{m[0]:.3f}, "
                  f"{m[1]:.3f}] | {row[base]:.3f} [{b[0]:.3f}, {b[1]:.3f}] | {row['trained']} "
                  f"| {row['bytes_to_cloud']:,.0f} | {row['bytes_to_server']:,.0f} | {seconds} "
                  f"| {len(row['failures'])} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=("run", "table"))
    parser.add_argument("--task", choices=tuple(TASKS), default="beauty")
    parser.add_argument("--devices", type=int, default=None, help="64 (beauty), 32 (personachat)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fraction", type=float, default=0.25, help="devices trained per round")
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--backbone", default="smollm2")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data")
    parser.add_argument("--work", default=str(ROOT / ".bench/federated"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.devices = args.devices or (64 if args.task == "beauty" else 32)
    {"run": run, "table": lambda a: table(a.out)}[args.phase](args)


if __name__ == "__main__":
    main()
