"""The SPA paper's Tables 1, 2, 3 and 7 on SmolLM2 and the shared data (issue 22), cell by cell.

    python benchmarks/paper_tables.py [--datasets xsum cnndm coqa sciq] [--settings ...]
        [--epochs 15] [--lrs 2e-4 5e-4 1e-3] [--train-size 500] [--sizes 100 300 1000]
    python benchmarks/paper_tables.py --table

A *cell* is one dataset × setting (base zero-shot and one-shot, lst, full, choice, spa, lora,
adapter) or, for Table 7, `spa` at one training-set size. A trained cell fits one checkpoint per
learning rate (cached features, resumable per epoch), keeps the rate with the lowest validation
loss — chosen on validation data, never on the test split — calibrates only that rate's gate
to the usage budget on validation data, and scores the test split: Rouge-L with a bootstrap 95 %
interval, device usage, M, and the latency model's T_total under `--profile` with the compute
measured in that run and the default tap encoding. Every finished cell is written at once to
benchmarks/results/paper_tables.json (with its config, hardware and date) and skipped by a rerun
with the same recipe (epochs, learning rates); a trained cell asked for with another recipe runs
again, resuming its checkpoints (e.g. 5 epochs → 15 continues the 5-epoch run).
`--skip SETTING=REASON` records why a cell could not run here instead of running it.

Table 1: base zero-shot / one-shot, lst, spa. Table 2: every setting's trainable share, its
inference, network and total latency for 50 new tokens, and Rouge-L. Table 3: S1 = full,
S2 = choice, S3 = lst, and SPA, with their device usage. Table 7: spa's usage as the training
set grows — the gate's own (uncalibrated) usage, since the calibrated one is the budget.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import hardware, write_results

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks/results/paper_tables.json"
DATASETS = ("xsum", "cnndm", "coqa", "sciq")
SETTINGS = ("base", "one-shot", "lst", "full", "choice", "spa", "lora", "adapter")
TOKENS = 50  # Table 2: the cost of 50 new tokens
GATED = ("choice", "spa")
FIT_WHOLE = {"coqa": 576}  # prompt tokens that fit every CoQA story (≤ 473 tokens) and question


def one_shot(tokenizer, record, demo, demo_tokens: int = 128) -> tuple:
    """The paper's one-shot row: one training example (its input cut to `demo_tokens`) shown
    before the input; returns the record and the tokens the example adds, so that the prompt cap
    can grow by as much and the input itself is cut no more than in the zero-shot row."""
    from personalization.training.data import Record

    ids = tokenizer(demo.input, add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(ids[:demo_tokens]) + (" …" if len(ids) > demo_tokens else "")
    shown = f"Example input:\n{text}\nExample output:\n{demo.output}\n\nInput:\n"
    added = len(tokenizer(shown, add_special_tokens=False)["input_ids"])
    return Record(record.instruction, shown + record.input, record.output, record.user), added


def data_config(args, dataset: str, train_size: int, valid_size: int, test_size: int):
    """The cell's split; CoQA's prompt cap fits its stories whole (`FIT_WHOLE`)."""
    from personalization.training.experiment import DataConfig

    cap = max(args.max_prompt_tokens, FIT_WHOLE.get(dataset, 0))
    return DataConfig(
        path=str(args.data / f"{dataset}.jsonl"),
        train_size=train_size,
        valid_size=valid_size,
        test_size=test_size,
        max_prompt_tokens=cap,
    )


def _load(results: Path) -> dict:
    return json.loads(results.read_text()) if results.is_file() else {"cells": {}}


def _save(results: dict, path: Path) -> None:
    write_results(results, path)


def cell_key(dataset: str, setting: str, size: int | None = None) -> str:
    return f"{dataset}/{setting}" + (f"/train={size}" if size else "")


def run_cell(args, dataset: str, setting: str, train_size: int) -> dict:
    from personalization.backbone.loading import load_backbone
    from personalization.config import SPAConfig
    from personalization.latency import profile
    from personalization.model import SPAModel
    from personalization.training.data import to_example
    from personalization.training.experiment import assess, fit, prepare_data
    from personalization.training.train import TrainConfig

    backbone = load_backbone(args.backbone)
    cfg_data = data_config(args, dataset, train_size, args.valid_size, args.test_size)
    max_prompt_tokens = cfg_data.max_prompt_tokens
    data = prepare_data(backbone, cfg_data)
    net = profile(args.profile)
    t0 = time.perf_counter()
    config: dict = {
        "train_size": len(data.train),
        "valid_size": len(data.valid),
        "test_size": len(data.test),
        "profile": args.profile,
        "max_prompt_tokens": max_prompt_tokens,
    }
    if setting in ("base", "one-shot"):
        model = SPAModel(backbone, SPAConfig(setting="base"))
        if setting == "one-shot":
            demo = data.splits.train[0]
            shots = [one_shot(backbone.tokenizer, r, demo) for r in data.splits.test]
            test = [
                to_example(
                    backbone, r, max_prompt_tokens=max_prompt_tokens + added, keep=data.splits.keep
                )
                for r, added in shots
            ]
            data = replace(data, test=test)
        report, _ = assess(model, data, net, max_new_tokens=args.max_new_tokens)
    else:
        tried = {}
        for lr in args.lrs:
            out = _checkpoint(args, dataset, setting, train_size, lr)
            cfg = TrainConfig(epochs=args.epochs, lr=lr, target_usage=args.target_usage)
            model = fit(backbone, data, setting, cfg, out, resume=True, calibrate_gate=False).model
            losses = validation(backbone, model, data)  # a finished checkpoint reports no epochs
            tried[lr] = (losses, model)
            print(f"  {dataset}/{setting} lr {lr:g}: validation loss {losses.lm:.4f}", flush=True)
        lr = min(tried, key=lambda k: tried[k][0].lm)
        losses, model = tried[lr][0], tried[lr][1].eval()
        config |= {
            "epochs": args.epochs,
            "lrs": list(args.lrs),
            "lr": lr,
            "valid_loss": {f"{k:g}": v.lm for k, (v, _) in tried.items()},
        }
        usage = args.target_usage if setting in GATED else None
        report, _ = assess(model, data, net, target_usage=usage, max_new_tokens=args.max_new_tokens)
    low, high = report.rouge_l_interval()
    figures = asdict(report)  # with each test example's Rouge-L, for paired comparisons
    if setting in GATED:
        figures |= gate_figures(backbone, model, data, losses)
    return figures | {
        "rouge_l_ci": [low, high],
        "cost_50_ms": TOKENS * report.t_total_ms,
        "config": config,
        "seconds": time.perf_counter() - t0,
        "hardware": hardware(),
    }


def _recipe(c) -> tuple[int, list[float]]:
    """(epochs, learning rates tried) of a finished cell or of the command line."""
    c = c["config"] if isinstance(c, dict) else vars(c)
    return c["epochs"], sorted(float(x) for x in c["lrs"])


def _recipes(cells: dict) -> str:
    """Which trained cells ran with which recipe, for the tables' header."""
    groups: dict[str, list[str]] = {}
    for key, c in cells.items():
        if "epochs" in c.get("config", {}):
            epochs, lrs = _recipe(c)
            tried = ", ".join(f"{x:g}" for x in lrs)
            lr = (
                f"lr {tried}" if len(lrs) == 1 else f"lr chosen from {{{tried}}} on validation loss"
            )
            groups.setdefault(f"{epochs} epochs, {lr}", []).append(key)
    return "; ".join(f"{recipe}: {', '.join(sorted(keys))}" for recipe, keys in groups.items())


def _checkpoint(args, dataset: str, setting: str, train_size: int, lr: float) -> Path:
    return Path(args.work) / f"{dataset}-{setting}-n{train_size}-lr{lr:g}.safetensors"


def validation(backbone, model, data):
    """The validation split's losses (LM, gate, share of tokens labelled "device"), read from
    cached features for a side network, through the backbone for an in-layer setting."""
    from personalization.training.features import make_cache
    from personalization.training.train import TrainConfig, evaluate_loss

    valid = data.valid
    if model.adapted is None:
        cache = make_cache(backbone, model.rungs, model.config.wire_dtype)
        cache.ensure(valid, progress=False)
        valid = cache.lazy(valid)
    return evaluate_loss(model.eval(), valid, TrainConfig())


def gate_figures(backbone, model, data, losses) -> dict:
    """Table 7's figures. The paper's gate is not calibrated to a budget, so its usage can fall
    as data grows; ours is calibrated (`usage` ≈ the budget by construction). What can fall here
    is the gate's own choice before calibration — the share of validation target tokens with
    p(device) ≥ 0.5 — and the share its training labels send to the device."""
    from personalization.training.features import make_cache
    from personalization.training.train import gate_probs

    cache = make_cache(backbone, model.rungs, model.config.wire_dtype)
    probs = gate_probs(model, cache.lazy(data.valid))
    return {"gate_usage": float((probs >= 0.5).float().mean()), "device_label": losses.device_label}


def backfill_gate_figures(args, dataset: str, setting: str, size: int, cell: dict) -> None:
    """Add `gate_figures` to a gated cell finished before they were recorded (its checkpoint)."""
    from personalization.backbone.loading import load_backbone
    from personalization.training.checkpoint import load_checkpoint
    from personalization.training.experiment import prepare_data

    c = cell["config"]
    backbone = load_backbone(args.backbone)
    data = prepare_data(backbone, data_config(args, dataset, size, c["valid_size"], c["test_size"]))
    model = load_checkpoint(_checkpoint(args, dataset, setting, size, c["lr"]), backbone)[0]
    cell |= gate_figures(backbone, model, data, validation(backbone, model, data))


def rescore(args) -> None:
    """Give finished base and trained cells that kept no per-example scores their scores: the test
    split generated again with the model (checkpoint and calibrated threshold) each ran with.
    Greedy decoding is deterministic, so the mean must come out as recorded; a cell that does not
    is reported and left alone."""
    from personalization.backbone.loading import load_backbone
    from personalization.config import SPAConfig
    from personalization.latency import profile
    from personalization.model import SPAModel
    from personalization.training.checkpoint import load_checkpoint
    from personalization.training.experiment import assess, prepare_data

    results, backbone = _load(args.out), load_backbone(args.backbone)
    for key, cell in results["cells"].items():
        dataset, setting, *size = key.split("/")
        if (
            "config" not in cell
            or "scores" in cell
            or setting == "one-shot"
            or (dataset not in args.datasets or setting not in args.settings)
        ):
            continue
        c, n = cell["config"], int(size[0].split("=")[1]) if size else args.train_size
        if size and n not in args.sizes:  # Table 7's cells only when their sizes are named
            continue
        data = prepare_data(
            backbone, data_config(args, dataset, n, c["valid_size"], c["test_size"])
        )
        if setting == "base":
            model = SPAModel(backbone, SPAConfig(setting="base"))
        else:
            model = load_checkpoint(_checkpoint(args, dataset, setting, n, c["lr"]), backbone)[0]
            model.config = replace(model.config, threshold=cell["threshold"])
        print(f"rescoring {key}", flush=True)
        report, _ = assess(
            model.eval(), data, profile(args.profile), max_new_tokens=args.max_new_tokens
        )
        if abs(report.rouge_l - cell["rouge_l"]) > 1e-6:
            print(
                f"  {key}: Rouge-L {report.rouge_l:.4f} now, {cell['rouge_l']:.4f} recorded; "
                "left without scores",
                flush=True,
            )
            continue
        cell["scores"] = list(report.scores)
        _save(results, args.out)


def run(args) -> None:
    results = _load(args.out)
    skips = dict(s.split("=", 1) for s in args.skip)
    todo = [(d, s, args.train_size) for d in args.datasets for s in args.settings]
    todo += [(d, "spa", n) for d in args.datasets for n in args.sizes if n != args.train_size]
    for i, (dataset, setting, size) in enumerate(todo, 1):
        key = cell_key(dataset, setting, None if size == args.train_size else size)
        done = results["cells"].get(key, {})
        stale = "epochs" in done.get("config", {}) and _recipe(done) != _recipe(args)
        if not stale and setting in GATED and "config" in done and "gate_usage" not in done:
            backfill_gate_figures(args, dataset, setting, size, done)
            _save(results, args.out)
        if done and (setting in skips or ("skipped" not in done and not stale)):
            continue  # kept: asked to skip, or finished with this recipe (else it runs again)
        if setting in skips:
            results["cells"][key] = {"skipped": skips[setting]}
        else:
            print(f"[{i}/{len(todo)}] {key}", flush=True)
            results["cells"][key] = run_cell(args, dataset, setting, size)
        results["config"] = {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
        }
        _save(results, args.out)
    harness.show(render, args.out)


def _cell(c: dict | None, what: str) -> str:
    if c is None:
        return "—"
    if "skipped" in c:
        return f"n/a ({c['skipped']})"
    if what == "rouge":
        lo, hi = c["rouge_l_ci"]
        return f"{c['rouge_l']:.2f} [{lo:.2f}, {hi:.2f}]"
    return f"{c[what]:.2f}"


def render(r: dict) -> str:
    """The results as Markdown (the docs' results page)."""
    lines: list[str] = []
    out = lines.append
    cells, cfg = r["cells"], r.get("config", {})
    datasets = [d for d in DATASETS if any(k.startswith(d + "/") for k in cells)]
    head = " | ".join(datasets)
    sizes = {}  # per dataset: the split sizes its cells ran with (a small file caps train)
    for key, c in cells.items():
        if "/train=" not in key and "config" in c:
            sizes[key.split("/")[0]] = "{train_size}/{valid_size}/{test_size}".format(**c["config"])
    out(
        f"Hardware: {r.get('hardware', '?')}; {r.get('date', '?')}; train/validation/test "
        "examples: " + ", ".join(f"{d} {sizes[d]}" for d in datasets if d in sizes) + "\n"
    )
    out(f"Trained cells — {_recipes(cells)}\n")
    out(f"Table 1 — Rouge-L [95 % CI]\n\n| setting | {head} |\n|---|" + "---|" * len(datasets))
    for s in ("base", "one-shot", "lst", "spa"):
        out(
            f"| {s} | " + " | ".join(_cell(cells.get(f"{d}/{s}"), "rouge") for d in datasets) + " |"
        )
    paired = (_paired(cells.get(f"{d}/spa"), cells.get(f"{d}/base")) for d in datasets)
    out("| spa − base, paired | " + " | ".join(paired) + " |")
    out(
        f"\nTable 2 — {TOKENS} new tokens on `{cfg.get('profile')}` (ms), Rouge-L. *inference*: "
        "cloud + device compute per token as measured in the cell's own run; *network*: the "
        "latency model on M (device round trips per token) and the bytes per token of the "
        "default tap encoding\n"
    )
    out(
        "| setting | dataset | trainable % | M | bytes / token | inference | network | total "
        "| Rouge-L |\n|---|---|---|---|---|---|---|---|---|"
    )
    for s in SETTINGS:
        for d in datasets:
            c = cells.get(f"{d}/{s}")
            if c is None or "skipped" in c:
                continue
            inference = TOKENS * (c["t_cloud_ms"] + c["t_device_ms"])
            out(
                f"| {s} | {d} | {c['trainable_pct']:.3f} | {c['m']:.2f} | "
                f"{c['bytes_per_token']:,.0f} | {inference:.0f} | "
                f"{TOKENS * c['t_net_ms']:.0f} | {c['cost_50_ms']:.0f} | "
                f"{c['rouge_l']:.2f} |"
            )
    out(
        f"\nTable 3 — Rouge-L (device usage)\n\n| setting | {head} |\n|---|"
        + "---|" * len(datasets)
    )
    for label, s in (
        ("S1 (full)", "full"),
        ("S2 (choice)", "choice"),
        ("S3 (lst)", "lst"),
        ("SPA", "spa"),
    ):
        row = []
        for d in datasets:
            c = cells.get(f"{d}/{s}")
            row.append(
                _cell(c, "rouge") + ("" if not c or "skipped" in c else f" ({c['usage']:.2f})")
            )
        out(f"| {label} | " + " | ".join(row) + " |")
    paired = (_paired(cells.get(f"{d}/spa"), cells.get(f"{d}/full")) for d in datasets)
    out("| SPA − S1, paired | " + " | ".join(paired) + " |")
    sizes = sorted({int(k.split("train=")[1]) for k in cells if "/train=" in k})
    if sizes:
        out(
            "\nTable 7 — spa by training-set size: the gate's own usage (p(device) ≥ 0.5 on "
            "validation targets), its calibrated usage in brackets, Rouge-L\n\n| dataset | "
            + " | ".join(f"{n} examples" for n in sizes)
            + f" | all (≤ {cfg.get('train_size')}) |"
        )
        out("|---|" + "---|" * (len(sizes) + 1))
        for d in datasets:
            row = [cells.get(cell_key(d, "spa", n)) for n in sizes] + [cells.get(f"{d}/spa")]
            out(f"| {d} | " + " | ".join(_table7(c) for c in row) + " |")
    return "\n".join(lines)


def _paired(a: dict | None, b: dict | None) -> str:
    """The mean per-example difference a − b on the same test examples, with its bootstrap 95 %
    interval (tighter than comparing two separate intervals); – where a cell kept no scores."""
    from personalization.training.evaluate import bootstrap_interval

    if not a or not b or "scores" not in a or "scores" not in b:
        return "–"
    diff = [x - y for x, y in zip(a["scores"], b["scores"], strict=True)]
    low, high = bootstrap_interval(diff)
    return f"{sum(diff) / len(diff):+.2f} [{low:+.2f}, {high:+.2f}]"


def _table7(c: dict | None) -> str:
    if c is None or "skipped" in c or "gate_usage" not in c:
        return _cell(c, "usage")
    n, epochs = c["config"]["train_size"], c["config"]["epochs"]
    return f"{c['gate_usage']:.2f} ({c['usage']:.2f}), {c['rouge_l']:.2f}, n = {n}, {epochs} ep"


def main() -> None:
    parser = harness.parser(__doc__, work=".bench/paper", results=RESULTS)
    parser.add_argument("--table", action="store_true", help="print the tables and stop")
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="add per-example scores to finished cells without them",
    )
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-4, 5e-4, 1e-3])
    parser.add_argument("--train-size", type=int, default=500)
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="*",
        default=[100, 300],
        help="Table 7: spa's other training-set sizes",
    )
    parser.add_argument("--valid-size", type=int, default=50)
    parser.add_argument("--test-size", type=int, default=100)
    parser.add_argument("--max-prompt-tokens", type=int, default=384)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--target-usage", type=float, default=0.5)
    parser.add_argument("--profile", default="lte")
    parser.add_argument("--skip", nargs="*", default=[], metavar="SETTING=REASON")
    args = parser.parse_args()
    if args.table:
        harness.show(render, args.out)
    elif args.rescore:
        rescore(args)
    else:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        run(args)


if __name__ == "__main__":
    main()
