"""Next-item recommendation on Amazon Beauty: the trained target against what users would
otherwise pick, on one split (issue 20).

    python benchmarks/recommend.py train    [--setting full] [--epochs 4]   # cached
    python benchmarks/recommend.py quality  [--users 500] [--methods ...]   # resumable
        [--relaxed-draft DRAFT.safetensors]  # the "relaxed" row: an AtSpeed-R draft
    python benchmarks/recommend.py table

The split is `personalization.atspeed.target.TargetConfig`'s: users shuffled by seed, 500 test
users and 100 validation users held out, every other user's purchase history (each purchase from
the ones before it) trains — the target, and on the same sequences the baselines: most popular,
SASRec and GRU4Rec from Cornac. Every user's validation and test items stay out of training. A test
user's history (purchases, then validation items) is the prompt; the truth is their test item.
One more reference row breaks that rule on purpose and says so: "recent popular" ranks the items
bought in the validation period (every user's validation items, all before the test period) —
what a time-split most-popular list can reach.

The generative methods (the backbone zero-shot, the trained target) return the top 20 of one
catalogue-constrained beam search with 20 beams, run as strict speculative search with the
backbone's first two layers as the draft — whose output is the target's own beam search (tests
check it) — and Recall / NDCG @ 5, 10, 20 are read from that list, for every method alike. The
"relaxed" row is the trained target under relaxed speculative search (K = 20, an AtSpeed-R draft
distilled by benchmarks/speculative_beam.py): its speed-up and "= beam" are against the trained
target's lists of the same users. Each method's ranked lists go to
.bench/recommend/<method>.jsonl as they are computed (a rerun resumes); the figures, with
bootstrap 95 % intervals, go to benchmarks/results/recommend.json together with
benchmarks/results/speculative_beam.json's rows (speed-up and acceptance at K = 1, 5, 10, 20),
and `table` prints both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _hardware import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from personalization.atspeed.target import TargetConfig  # noqa: E402

RESULTS = ROOT / "benchmarks/results/recommend.json"
KS = (5, 10, 20)
RELAXED = "trained target, relaxed"
METHODS = ("most popular", "recent popular", "SASRec", "GRU4Rec", "zero-shot backbone",
           "trained target", RELAXED)  # fmt: skip
GENERATIVE = ("zero-shot backbone", "trained target", RELAXED)
SPECULATIVE = ROOT / "benchmarks/results/speculative_beam.json"


def _split(args) -> tuple[list[dict], list[list[str]], list[str]]:
    """The test users (history + validation items → test item), the training sequences, and the
    validation period's purchases (every user's validation items)."""
    import random

    from personalization.training.data import read_jsonl

    cfg = TargetConfig(setting=args.setting, seed=args.seed)
    rows = list(read_jsonl(args.data / "beauty.jsonl"))
    random.Random(cfg.seed).shuffle(rows)  # as training.data.load_splits
    test = rows[: cfg.test_users][: args.users]
    train = rows[cfg.test_users + cfg.valid_users :]
    users = [{"user": r["user_id"], "history": r["history"] + r["valid"], "truth": r["test"][0]}
             for r in test]  # fmt: skip
    return users, [r["history"] for r in train], [t for r in rows for t in r["valid"]]


def _target(args):
    from personalization.atspeed.target import target_path
    from personalization.backbone.loading import load_backbone

    backbone = load_backbone(args.backbone)
    return backbone, target_path(backbone, _target_config(args))


def _target_config(args) -> TargetConfig:
    return TargetConfig(setting=args.setting, epochs=args.epochs, lr=args.lr, seed=args.seed)


def train(args) -> None:
    from personalization.atspeed.target import train_target
    from personalization.backbone.loading import load_backbone

    backbone = load_backbone(args.backbone)
    t0 = time.perf_counter()
    path = train_target(backbone, args.data / "beauty.jsonl", _target_config(args))
    print(f"trained target: {path} ({(time.perf_counter() - t0) / 60:.1f} min)")


def _rank_generative(args, model, users, out: Path, relaxed: Path | None = None) -> None:
    """Top-20 titles per user by strict speculative beam search (= the model's beam search), or
    with `relaxed` (an AtSpeed-R draft) by relaxed speculative search."""
    from personalization.atspeed.catalogue import Catalogue
    from personalization.atspeed.draft import Draft, DraftConfig
    from personalization.atspeed.recommend import (
        RecommendConfig,
        history_prompt,
        load_titles,
        recommend,
    )

    backbone = model.backbone
    catalogue = Catalogue.from_titles(backbone, load_titles(args.data / "beauty_items.json"))
    strict = relaxed is None
    draft = Draft(backbone, DraftConfig(layers=2)) if strict else Draft.load(relaxed, backbone)[0]
    cfg = RecommendConfig(strategy="speculative-strict" if strict else "speculative-relaxed",
                          k=max(KS), gamma=5, draft_beams=max(KS))  # fmt: skip
    done = _done(out)
    todo = [u for u in users[: args.limit] if u["user"] not in done]
    if args.reverse:  # a second process on the same method works from the other end
        todo.reverse()
    with out.open("a") as f:
        for u in tqdm(todo, desc=out.stem, unit="user"):
            t0 = time.perf_counter()
            result = recommend(model, catalogue, [history_prompt(backbone, u["history"])], cfg,
                               draft)  # fmt: skip
            seconds = time.perf_counter() - t0
            titles = [i.title for i in result.items[0]]
            f.write(json.dumps({"user": u["user"], "titles": titles, "s": seconds}) + "\n")
            f.flush()


def _done(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {json.loads(line)["user"] for line in path.read_text().splitlines() if line.strip()}


def quality(args) -> None:
    users, sequences, recent = _split(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"{len(users)} test users; {len(sequences)} training sequences, "
          f"{sum(len(s) for s in sequences)} purchases", flush=True)  # fmt: skip
    for method in args.methods:
        out = work / f"{method.replace(' ', '-')}.jsonl"
        if method not in GENERATIVE:
            if len(_done(out)) >= len(users):
                continue
            from personalization.atspeed.baselines import MostPopular, Sequential

            t0 = time.perf_counter()
            if method == "most popular":
                model = MostPopular(sequences)
            elif method == "recent popular":
                model = MostPopular([recent])
            else:
                model = Sequential(sequences, method.lower(), **_cornac_options(args))
            fit_s = time.perf_counter() - t0
            with out.open("w") as f:
                for u in users:
                    t0 = time.perf_counter()
                    titles = model.recommend(u["history"], max(KS))
                    seconds = time.perf_counter() - t0
                    f.write(json.dumps({"user": u["user"], "titles": titles, "s": seconds,
                                        "fit_s": fit_s}) + "\n")  # fmt: skip
            print(f"{method}: fitted in {fit_s:.0f} s", flush=True)
        else:
            from personalization.config import SPAConfig
            from personalization.model import SPAModel
            from personalization.training.checkpoint import load_checkpoint

            backbone, path = _target(args)
            if method == "zero-shot backbone":
                model = SPAModel(backbone, SPAConfig(setting="base"))
            elif not path.is_file():
                print(f"{method}: not trained yet ({path}); run the train phase", flush=True)
                continue
            elif method == RELAXED and args.relaxed_draft is None:
                print(f"{method}: needs --relaxed-draft (an AtSpeed-R draft)", flush=True)
                continue
            else:
                model = load_checkpoint(path, backbone)[0].eval()
            draft = args.relaxed_draft if method == RELAXED else None
            _rank_generative(args, model, users, out, draft)
    summarise(args, users)


def _cornac_options(args) -> dict:
    return {"n_epochs": args.cornac_epochs, "batch_size": 128, "seed": args.seed}


def _rows(args, method: str, truths: dict) -> list[dict]:
    path = Path(args.work) / f"{method.replace(' ', '-')}.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    first = {}
    for r in rows:  # two processes meeting in the middle may both score one user: keep one
        first.setdefault(r["user"], r)
    return [r for r in first.values() if r["user"] in truths]


def summarise(args, users) -> None:
    from personalization.atspeed.recommend import metrics
    from personalization.training.evaluate import bootstrap_interval

    truths = {u["user"]: u["truth"] for u in users}
    if args.relaxed_draft:
        relaxed = f"20 beams, relaxed speculative (γ = 5, N = 20), draft {args.relaxed_draft.name}"
    else:  # a run of other methods keeps the label of the run that made the relaxed rows
        earlier = json.loads(args.out.read_text()) if args.out.is_file() else {}
        relaxed = earlier.get("config", {}).get("relaxed", "no relaxed run")
    results = {"methods": {}, "config": {
        "users": len(users), "ks": KS, "target": asdict(_target_config(args)),
        "cornac": _cornac_options(args), "search": "20 beams, strict speculative (γ = 5)",
        "relaxed": relaxed,
    }}  # fmt: skip
    beam = {r["user"]: r for r in _rows(args, "trained target", truths)}
    for method in METHODS:
        rows = _rows(args, method, truths)
        if not rows:
            continue
        if len(rows) < len(users):  # a row on fewer users says so (`users`), never silently
            print(f"{method}: {len(rows)} of {len(users)} users", flush=True)
        entry = {"users": len(rows), "s_per_user": sum(r["s"] for r in rows) / len(rows)}
        for k in KS:
            for name in (f"recall@{k}", f"ndcg@{k}"):
                per_user = [metrics([r["titles"]], [truths[r["user"]]], k)[name] for r in rows]
                entry[name] = sum(per_user) / len(per_user)
                entry[name + "_ci"] = bootstrap_interval(per_user)
        if method == RELAXED and all(r["user"] in beam for r in rows):  # the same users' beam
            entry["recall@20_beam_same_users"] = sum(
                metrics([beam[r["user"]]["titles"]], [truths[r["user"]]], 20)["recall@20"]
                for r in rows
            ) / len(rows)
            entry["speed_up"] = sum(beam[r["user"]]["s"] for r in rows) / sum(r["s"] for r in rows)
            entry["same_as_beam"] = sum(r["titles"] == beam[r["user"]]["titles"] for r in rows)
        results["methods"][method] = entry
    _, path = _target(args)
    if path.with_suffix(".json").is_file():  # how the trained target was trained (train_target)
        results["target_training"] = json.loads(path.with_suffix(".json").read_text())
    if SPECULATIVE.is_file():  # speed-up and acceptance at every K, from its own run
        speculative = json.loads(SPECULATIVE.read_text())
        results["speculative"] = {k: speculative[k] for k in ("rows", "config", "hardware", "date")}
    write_results(results, args.out)
    table(args.out)


def table(path: Path) -> None:
    r = json.loads(Path(path).read_text())
    print(f"Hardware: {r['hardware']}; {r['date']}; {r['config']['users']} test users\n")
    head = " | ".join(f"Recall@{k} | NDCG@{k}" for k in KS)
    print(f"| method | users | {head} | s / user | speed-up | = beam |")
    print("|---|---|" + "---|" * (2 * len(KS) + 3))
    for method, e in r["methods"].items():
        cells = " | ".join(
            f"{e[n]:.3f} [{e[n + '_ci'][0]:.3f}, {e[n + '_ci'][1]:.3f}]"
            for k in KS
            for n in (f"recall@{k}", f"ndcg@{k}")
        )
        speed = f"{e['speed_up']:.2f}×" if "speed_up" in e else ""
        same = f"{e['same_as_beam']}/{e['users']}" if "same_as_beam" in e else ""
        print(f"| {method} | {e['users']} | {cells} | {e['s_per_user']:.3f} | {speed} | {same} |")
    if "speculative" in r:
        s = r["speculative"]
        print(f"\nSpeculative beam search on the target ({s['config']['target']}), "
              f"{s['config']['users']} users; {s['hardware']}; {s['date']}\n")  # fmt: skip
        print("| K | method | Recall@K | NDCG@K | s / user | speed-up | acceptance | = beam |")
        print("|---|---|---|---|---|---|---|---|")
        for row in s["rows"]:
            k = row["K"]
            accept = f"{row['accept']:.2f}" if row["accept"] is not None else ""
            quality = f"{row[f'recall@{k}']:.3f} | {row[f'ndcg@{k}']:.3f}"
            print(f"| {k} | {row['method']} | {quality} | {row['s/user']:.2f} "
                  f"| {row['speed-up']:.2f}× | {accept} | {row['same']} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=("train", "quality", "table"))
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data")
    parser.add_argument("--backbone", default="smollm2")
    parser.add_argument("--setting", default="full", help="the trained target's plug-in")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--users", type=int, default=500, help="test users scored")
    parser.add_argument(
        "--reverse",
        action="store_true",
        help="score users from the last (a second process on the same method)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="score only the first N of them with the generative methods run now "
        "(their rows then say on how many users)",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--cornac-epochs", type=int, default=30)
    parser.add_argument(
        "--relaxed-draft",
        type=Path,
        default=None,
        help="an AtSpeed-R draft (benchmarks/speculative_beam.py distils one)",
    )
    parser.add_argument("--work", default=str(ROOT / ".bench/recommend"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    {"train": train, "quality": quality, "table": lambda a: table(a.out)}[args.phase](args)


if __name__ == "__main__":
    main()
