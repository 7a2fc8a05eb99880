"""Why a side network helps on one slice and not another (issue 22): validation loss of `spa`'s
side network by learning rate, width and epoch, against the backbone's own loss on the same
validation targets — on validation data only, never the test split.

    python benchmarks/side_study.py [--datasets sciq coqa xsum] [--lrs 5e-4 1e-3 3e-3]
        [--reductions 8] [--epochs 15] [--train-size 200]
    python benchmarks/side_study.py --table

The split is paper_tables.py's (same seed and sizes, so the cached backbone features are reused).
Each variant trains once for `--epochs` at a constant learning rate and records the validation
LM loss after every epoch, so one run answers "how many epochs" too. `gain` is the backbone's
validation loss minus the side network's (nats per target token; > 0: the device helps), and
`device` the share of validation tokens whose gate label is "device" (the device's answer beats
the backbone's by the margin). Rows go to benchmarks/results/side_study.json as they finish; a
rerun skips finished rows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from benchmarks import harness
from benchmarks.harness import write_results
from benchmarks.paper_tables import data_config

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks/results/side_study.json"


def variant(args, backbone, data, lr: float, reduction: int) -> dict:
    import torch

    from personalization.config import SideConfig, SPAConfig
    from personalization.model import SPAModel
    from personalization.training.features import make_cache
    from personalization.training.train import TrainConfig, train

    side = SideConfig(
        hidden_size=backbone.hidden_size, num_layers=backbone.num_layers, reduction=reduction
    )
    model = SPAModel(backbone, SPAConfig(setting="spa"), side)
    cache = make_cache(backbone, model.rungs, model.config.wire_dtype)
    cache.ensure(data.train + data.valid, progress=True)
    train_data, valid = cache.lazy(data.train), cache.lazy(data.valid)
    base = -float(torch.cat([f.base_logprob for f in valid]).mean())
    t0 = time.perf_counter()
    cfg = TrainConfig(epochs=args.epochs, lr=lr, seed=args.seed)
    epochs = train(model, train_data, cfg, valid=valid, progress=False).epochs
    losses = [e["valid"]["lm"] for e in epochs]
    best = min(range(len(losses)), key=losses.__getitem__)
    return {
        "lr": lr,
        "reduction": reduction,
        "width": side.width,
        "trainable_pct": 100 * model.trainable_parameters() / backbone.num_parameters,
        "base_loss": base,
        "valid_loss": losses,
        "best_epoch": best + 1,
        "gain_at_5": base - losses[min(4, len(losses) - 1)],
        "gain_best": base - losses[best],
        "device_best": epochs[best]["valid"]["device_label"],
        "seconds": time.perf_counter() - t0,
    }


def run(args) -> None:
    from personalization.backbone.loading import load_backbone
    from personalization.training.experiment import prepare_data

    results = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": {}}
    backbone = load_backbone(args.backbone)
    todo = [(d, lr, r) for d in args.datasets for r in args.reductions for lr in args.lrs]
    for dataset, lr, reduction in tqdm(todo, desc="variants"):
        key = f"{dataset}/r{reduction}/lr{lr:g}/n{args.train_size}/e{args.epochs}"
        if key in results["rows"]:
            continue
        split = data_config(args, dataset, args.train_size, args.valid_size, args.test_size)
        data = prepare_data(backbone, split)
        results["rows"][key] = {"dataset": dataset, "train_size": len(data.train)} | variant(
            args, backbone, data, lr, reduction
        )
        results["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        write_results(results, args.out)
    harness.show(render, args.out)


def render(r: dict) -> str:
    """The results as Markdown (the docs' results page): validation loss in nats per target
    token."""
    rows = []
    for row in r["rows"].values():
        losses = row["valid_loss"]
        rows.append([
            row["dataset"], row["train_size"], row["width"], f"{row['lr']:g}",
            f"{row['base_loss']:.3f}", f"{losses[min(4, len(losses) - 1)]:.3f}",
            f"{min(losses):.3f} ({row['best_epoch']})", f"{row['gain_at_5']:+.3f}",
            f"{row['gain_best']:+.3f}", f"{row['device_best']:.2f}",
        ])  # fmt: skip
    headers = ["dataset", "train", "width", "lr", "backbone", "side @ 5 epochs", "best (epoch)",
               "gain @ 5", "best gain", "device labels"]  # fmt: skip
    return harness.table(headers, rows)


def main() -> None:
    parser = harness.parser(__doc__, results=RESULTS)
    parser.add_argument("--table", action="store_true", help="print the table and stop")
    parser.add_argument("--datasets", nargs="+", default=["sciq", "coqa", "xsum"])
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 1e-3, 3e-3])
    parser.add_argument("--reductions", type=int, nargs="+", default=[8])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--train-size", type=int, default=200)
    parser.add_argument("--valid-size", type=int, default=20)
    parser.add_argument("--test-size", type=int, default=50)
    parser.add_argument("--max-prompt-tokens", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    harness.show(render, args.out) if args.table else run(args)


if __name__ == "__main__":
    main()
