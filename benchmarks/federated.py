"""Federated experiments large enough to show a difference (issue 21): every strategy × round with
the task's metric and its bootstrap 95 % interval over devices, `base` beside it, bytes each
device sent to the cloud and to the server, the round's wall time, failures.

    python benchmarks/federated.py run --task beauty       [--devices 64] [--rounds 5]
        [--fraction 0.25] [--strategies local fedavg fedper fedavg-ft] [--backbone smollm2]
    python benchmarks/federated.py run --task personachat  [--devices 32] ...
    python benchmarks/federated.py table

- beauty: each device is a user of `beauty.jsonl` (AtSpeed's time split: the code target the
  cloud serves trained centrally on every user's purchases before the validation period),
  holding its purchases (history, then validation items) but the last, which it is scored on:
  Recall / NDCG @ 10 of its side network — trained on its purchases as the cloud's item codes —
  on the cloud's catalogue search. `base` is the cloud's own code target on the same item (the
  one `spa train-target` trained). Every round also measures the held-out purchase's loss per
  code token (`item-nll`, beside the coded backbone's own), which the central target gets on the
  same items too (`central`); with `--search-rounds last` (`none`) the costly search runs in the
  last round only (never). Devices train `lst`, the code target's own setting.
- personachat: each device is one user (persona sentences as free text, then replies), scored
  on its last two replies by Rouge-L; `base` is the backbone alone.

Each strategy is one `spa federate` run (the simulation engine) under
.bench/federated/<task>/<strategy>; a finished run is not run again. One cloud serves them all,
so its deterministic ranking of a user (`base`) is searched once and then answered from its
memory (`spa cloud --recommend-cache`) for every round and strategy. Figures go to
benchmarks/results/federated.json, and `table` prints the Markdown tables from it.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import hardware, write_results

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks/results/federated.json"
STRATEGIES = ("local", "fedavg", "fedper", "fedavg-ft")
TASKS = {  # (metric, its base) pairs, held-out items per device
    "beauty": ((("recall@10", "recall@10-cloud"), ("item-nll", "item-nll-backbone")), 1),
    "personachat": ((("rouge-l", "rouge-l-base"),), 2),
}


def _users(args, work: Path) -> Path:
    """The devices' users as a data file: node i = its i-th row (a seeded shuffle)."""
    from personalization.training.data import read_jsonl

    name = "beauty.jsonl" if args.task == "beauty" else "personachat.jsonl"
    rows = list(read_jsonl(args.data / name))
    if args.task == "beauty":
        random.Random(0).shuffle(rows)
    out = work / name
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[: args.devices]))
    return out


def run(args) -> None:
    from app.cloud_process import cloud

    work = Path(args.work) / args.task
    work.mkdir(parents=True, exist_ok=True)
    data = _users(args, work)
    _, held_out = TASKS[args.task]
    todo = [s for s in args.strategies if not (work / s / f"{s}.md").is_file()]
    for strategy in set(args.strategies) - set(todo):
        print(f"{args.task}/{strategy}: done already", flush=True)
    catalogue = args.data / "beauty_items.json" if args.task == "beauty" else None
    if todo:
        with cloud(args.backbone, work, catalogue=catalogue) as url:
            for strategy in todo:
                _run_one(args, strategy, data, work / strategy, url, held_out)
    summarise(args)


def _run_one(args, strategy: str, data: Path, out: Path, url: str, held_out: int) -> None:
    from app.federation.launch import federate

    t0 = time.perf_counter()
    code = federate(
        strategy=strategy,
        nodes=args.devices,
        rounds=args.rounds,
        data=data,
        work=out,
        backbone=args.backbone,
        cloud_url=url,
        extra={
            "run-name": strategy,
            **({"setting": "lst"} if args.task == "beauty" else {}),
            "local-epochs": args.local_epochs,
            "held-out": held_out,
            "fraction-train": args.fraction,
            "search-rounds": args.search_rounds,
            "min-nodes": max(1, round(args.devices * args.fraction) - 1),
        },
    )
    print(f"{args.task}/{strategy}: exit {code} in {time.perf_counter() - t0:.0f} s", flush=True)


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
    pairs, _ = TASKS[args.task]
    work = Path(args.work) / args.task
    rows = []
    for strategy in STRATEGIES:
        db = work / strategy / "federated.db"
        if not (work / strategy / f"{strategy}.md").is_file():
            continue
        for rnd, r in sorted(_per_round(db, strategy).items()):
            sent = r["train"]
            row = {"strategy": strategy, "round": rnd, "devices": len(r["evaluate"])}
            for name in (name for pair in pairs for name in pair):
                values = [m[name] for m in r["evaluate"] if name in m]
                if values:
                    row |= {name: _mean(values), f"{name}_ci": bootstrap_interval(values)}
            for metric, base in pairs:  # paired over devices: tighter than two intervals
                diff = [m[metric] - m[base] for m in r["evaluate"] if metric in m and base in m]
                if diff:
                    row |= {
                        f"{metric} − base": _mean(diff),
                        f"{metric} − base_ci": bootstrap_interval(diff),
                    }
            rows.append(
                row
                | {
                    "trained": len(sent),
                    "bytes_to_cloud": sum(m["bytes-to-cloud"] for m in sent) / max(len(sent), 1),
                    "bytes_to_server": sum(m["bytes-to-server"] for m in sent) / max(len(sent), 1),
                    "seconds": r["all"].get("round-seconds"),
                    "failures": r.get("failures", []),
                }
            )
    results["tasks"][args.task] = {
        "rows": rows,
        "metrics": pairs,
        "central": central(args, work / "beauty.jsonl") if args.task == "beauty" else None,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "hardware": hardware(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
    }
    write_results(results, args.out)
    harness.show(render, args.out)


def central(args, data: Path) -> dict:
    """The cloud's code target (`spa train-target`, trained centrally on every user's purchases
    before the validation period) on the devices' own held-out purchases: its loss per code
    token, teacher-forced on the same ids the devices use."""
    from device_agent.history import purchases_of
    from personalization.atspeed.code_target import default_code_target, load_code_target
    from personalization.atspeed.codes import cached_codes
    from personalization.atspeed.recommend import load_titles
    from personalization.backbone.loading import load_backbone
    from personalization.training.data import read_jsonl
    from personalization.training.evaluate import bootstrap_interval
    from personalization.training.features import make_cache
    from personalization.training.train import TrainConfig, evaluate_loss

    backbone = load_backbone(args.backbone)
    titles = load_titles(args.data / "beauty_items.json")
    trained = default_code_target(backbone, titles)
    if trained is None:
        return {"target": "none: spa train-target has not run"}
    rec = load_code_target(trained[0], backbone, cached_codes(titles, trained[1]))
    cache = make_cache(rec.backbone, rec.model.rungs, rec.model.config.wire_dtype)
    losses, n = [], TASKS["beauty"][1]
    for row in list(read_jsonl(data))[: args.devices]:
        purchases = purchases_of(data, str(row["user_id"])) or []
        example = rec.prompts.later_example(purchases[:-n], purchases[-n:])
        if example is not None:
            cache.ensure([example], progress=False)
            losses.append(evaluate_loss(rec.model, cache.lazy([example]), TrainConfig()).lm)
    return {
        "target": f"{trained[0].name} ({rec.model.setting})",
        "devices": len(losses),
        "item-nll": _mean(losses),
        "item-nll_ci": bootstrap_interval(losses),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def render(r: dict) -> str:
    """The results as Markdown (the docs' results page)."""
    lines: list[str] = []
    out = lines.append
    for task, t in r["tasks"].items():  # each task: the machine and date it was summarised on
        out(f"Hardware: {t.get('hardware', r['hardware'])}; {t.get('date', r['date'])}")
        pairs = t.get("metrics") or [(t["metric"], t["base"])]
        names = [n for pair in pairs for n in pair]
        names += [f"{m} − base" for m, _ in pairs if any(f"{m} − base" in r for r in t["rows"])]
        c = t["config"]
        out(
            f"\n{task}: {c['devices']} devices, {c['rounds']} rounds, {c['fraction']} of them "
            f"trained per round, {c['local_epochs']} local epochs, "
            f"{c['backbone']}\n"
        )
        out(
            f"| strategy | round | {' | '.join(names)} | devices trained | bytes to cloud "
            "/ device | bytes to server / device | round s | failures |"
        )
        out("|---|---|" + "---|" * len(names) + "---|---|---|---|---|")
        for row in t["rows"]:
            seconds = f"{row['seconds']:.0f}" if row["seconds"] is not None else "–"
            out(
                f"| {row['strategy']} | {row['round']} | "
                + " | ".join(_figure(row, n) for n in names)
                + f" | {row['trained']} | {row['bytes_to_cloud']:,.0f} | "
                f"{row['bytes_to_server']:,.0f} | {seconds} | "
                f"{len(row['failures'])} |"
            )
        if t.get("central"):
            c = t["central"]
            out(
                f"\nCentral target {c['target']} on the same devices' held-out items: "
                + (f"item-nll {_figure(c, 'item-nll')}; " if "item-nll" in c else "")
                + "its Recall@10 is the recall@10-cloud column"
            )
    return "\n".join(lines)


def _figure(row: dict, name: str) -> str:
    """A metric with its interval; – in a round that did not measure it."""
    if name not in row:
        return "–"
    low, high = row[f"{name}_ci"]
    return f"{row[name]:.3f} [{low:.3f}, {high:.3f}]"


def main() -> None:
    parser = harness.parser(__doc__, work=".bench/federated", results=RESULTS)
    parser.add_argument("phase", choices=("run", "table"))
    parser.add_argument("--task", choices=tuple(TASKS), default="beauty")
    parser.add_argument("--devices", type=int, default=None, help="64 (beauty), 32 (personachat)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fraction", type=float, default=0.25, help="devices trained per round")
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument(
        "--search-rounds",
        choices=("every", "last", "none"),
        default="every",
        help="beauty: the catalogue search every round, in the last only, or never",
    )
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    args = parser.parse_args()
    args.devices = args.devices or (64 if args.task == "beauty" else 32)
    {"run": run, "table": lambda a: harness.show(render, a.out)}[args.phase](args)


if __name__ == "__main__":
    main()
