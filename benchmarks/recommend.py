"""Next-item recommendation on item codes, as AtSpeed runs it (issue 34).

    python benchmarks/recommend.py codes                       # build (cached) and report codes
    python benchmarks/recommend.py train  [--epochs 20] [--lrs 1e-3 3e-3]   # each cached when done
    python benchmarks/recommend.py quality [--methods ...] [--eval-data FILE]  # resumable
    python benchmarks/recommend.py speed  [--speed-users 100] [--recall-users 300]
    python benchmarks/recommend.py table                # the tables of the docs' results page

The split is AtSpeed's (`personalization.atspeed.split`): by global time, every user kept —
everything before the validation period trains, the validation items choose the epoch, and every
user with a test item is scored on all of their test items from their last ≤ 20 purchases
(history + validation). Methods on the same users, same run: the code target (beam search over the
code trie, 20 beams; Recall/NDCG @ 5, 10, 20 read from its top 20), most popular (training
period), recent popular (the validation period), the content baseline (TF-IDF nearest to the last
purchases; how many, and whether bought items are skipped, chosen on validation), SASRec and
GRU4Rec (Cornac). Each method's lists go to .bench/recommend/<method>.jsonl as they are made.

`speed` distils AtSpeed-S and AtSpeed-R drafts (the coded backbone's first layers; teacher: the
target's own beam search on training-period windows) and times, user by user in rotating order,
the target's beam search against strict and relaxed speculative search at K = 1, 5, 10, 20; relaxed
recall at K = 20 is compared with the beam lists of the same users.

Figures with bootstrap 95 % intervals (paired over users for differences) go to
benchmarks/results/recommend.json; its `summary` holds the figures issue 34 names.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from benchmarks import harness
from benchmarks.harness import write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results/recommend.json"
KS = (5, 10, 20)
TARGET = "code target"
BASELINES = ("most popular", "recent popular", "content", "SASRec", "GRU4Rec")
METHODS = (TARGET, *BASELINES)
SPEED_KS = (1, 5, 10, 20)


# ---- shared pieces -------------------------------------------------------------------------------
def _users(path: Path):
    from personalization.atspeed.split import load_users

    return load_users(path)


def _codes(args):
    from personalization.atspeed.codes import CodeConfig, cached_codes
    from personalization.atspeed.recommend import load_titles

    return cached_codes(load_titles(args.data / "beauty_items.json"), CodeConfig(seed=args.seed))


def _sweep(args) -> list[tuple]:
    """(config, trained target, its best validation loss) for every learning rate of --lrs,
    best first: each trained once and cached; the best on validation is the code target."""
    from personalization.atspeed.code_target import CodeTargetConfig, train_code_target
    from personalization.backbone.loading import load_backbone

    backbone, codes, users = load_backbone(args.backbone), _codes(args), None
    runs = []
    for lr in args.lrs:
        cfg = CodeTargetConfig(epochs=args.epochs, lr=lr, seed=args.seed)
        users = users or _users(args.data / "beauty.jsonl")
        trained = train_code_target(backbone, codes, users, cfg)
        runs.append((cfg, trained, min(e["valid"]["lm"] for e in trained.epochs)))
    return sorted(runs, key=lambda run: run[2])


def _recommender(args):
    from personalization.atspeed.code_target import load_code_target, make_default
    from personalization.backbone.loading import load_backbone

    _, trained, _ = _sweep(args)[0]
    backbone, codes = load_backbone(args.backbone), _codes(args)
    make_default(backbone, codes, trained.path)  # spa recommend and the cloud use it too
    return load_code_target(trained.path, backbone, codes), trained


def _work(args) -> Path:
    tag = "" if args.eval_data is None else "-" + args.eval_data.stem
    work = Path(args.work + tag)
    work.mkdir(parents=True, exist_ok=True)
    return work


def _read(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return {r["user"]: r for r in rows}


# ---- phases --------------------------------------------------------------------------------------
def codes(args) -> None:
    c = _codes(args)
    print(json.dumps({"config": asdict(c.config), **c.stats}, indent=1))


def train(args) -> None:
    for cfg, trained, loss in _sweep(args):
        print(
            f"lr {cfg.lr:g}: best validation loss {loss:.4f} at epoch {trained.best_epoch}; "
            f"{trained.seconds}; {trained.path}"
        )
    _recommender(args)


def _content_choice(args, users, titles) -> dict:
    """The content baseline's recent items and seen-item rule, by validation Recall@10."""
    from personalization.atspeed.baselines import Content
    from personalization.atspeed.recommend import metrics
    from personalization.atspeed.split import valid_cases

    cases = valid_cases(users)
    best = None
    for recent in (1, 2, 3, 5):
        for exclude in (False, True):
            model = Content(titles, recent, exclude)
            r = metrics(
                [model.recommend(c.items, 10) for c in cases], [c.truth for c in cases], 10
            )["recall@10"]
            if best is None or r > best["valid_recall@10"]:
                best = {"recent": recent, "exclude_seen": exclude, "valid_recall@10": r}
    return best


def _baseline(args, method, train_users, titles):
    from personalization.atspeed.baselines import Content, MostPopular, Sequential
    from personalization.atspeed.split import training_sequences, validation_period

    if method == "most popular":
        return MostPopular(training_sequences(train_users)), {}
    if method == "recent popular":
        return MostPopular([validation_period(train_users)]), {}
    if method == "content":
        choice = _content_choice(args, train_users, titles)
        return Content(titles, choice["recent"], choice["exclude_seen"]), choice
    options = {"n_epochs": args.cornac_epochs, "batch_size": 128, "seed": args.seed}
    return Sequential(training_sequences(train_users), method.lower(), **options), options


class CodeRanker:
    """The code target as a ranker like the baselines: beam search with k beams."""

    def __init__(self, rec, exclude_purchased: bool, prior=None):
        self.rec, self.exclude_purchased, self.prior = rec, exclude_purchased, prior

    def recommend(self, history, k: int) -> list[str]:
        from personalization.atspeed.recommend import RecommendConfig

        items = [t for t in history if t in self.rec.index]  # --eval-data: unknown items aside
        found = self.rec.recommend(
            items, RecommendConfig(k=k), exclude_purchased=self.exclude_purchased, prior=self.prior
        )
        return [i.title for i in found.items[0]]


PRIOR_WEIGHTS, PRIOR_RECENT = (0.0, 1.0, 2.0, 3.0), (1, 2, 3)


def _target_choice(args, rec, users, path: Path) -> dict:
    """Whether the target skips items already bought, then its history prior (weight at two
    recent purchases, then how many purchases count), each by validation Recall@10; every
    score is kept as it is measured, so an interrupted choice resumes. The chosen prior is
    recorded beside the target (`keep_prior`): `spa recommend` and the cloud use it too."""
    from personalization.atspeed.code_target import HistoryPrior, keep_prior
    from personalization.atspeed.recommend import metrics
    from personalization.atspeed.split import valid_cases

    memo = _work(args) / f"target-choice-{rec.backbone.fingerprint[:8]}.json"
    choice = json.loads(memo.read_text()) if memo.is_file() else {}
    choice.setdefault("prior_recall@10", {})
    cases = valid_cases(users)[: args.valid_users]

    def recall(exclude: bool, prior: HistoryPrior) -> float:
        ranker = CodeRanker(rec, exclude, prior)
        desc = f"validation, exclude={exclude}, prior {prior.weight:g}×{prior.recent}"
        lists = [ranker.recommend(c.items, 10) for c in tqdm(cases, desc=desc)]
        return metrics(lists, [c.truth for c in cases], 10)["recall@10"]

    if "exclude_purchased" not in choice:
        scores = {x: recall(x, HistoryPrior()) for x in (False, True)}
        choice |= {
            "exclude_purchased": scores[True] >= scores[False],
            "valid_users": len(cases),
            "valid_recall@10": {"exclude": scores[True], "keep": scores[False]},
        }
    exclude, tried = choice["exclude_purchased"], choice["prior_recall@10"]
    tried.setdefault("0x2", choice["valid_recall@10"]["exclude" if exclude else "keep"])

    def score(weight: float, recent: int) -> float:
        key = f"{weight:g}x{recent}"
        if key not in tried:
            tried[key] = recall(exclude, HistoryPrior(weight=weight, recent=recent))
            memo.write_text(json.dumps(choice))
        return tried[key]

    weight = max(PRIOR_WEIGHTS, key=lambda w: score(w, 2))
    recent = max(PRIOR_RECENT, key=lambda r: score(weight, r)) if weight else 2
    prior = HistoryPrior(weight=weight, recent=recent)
    choice["prior"] = asdict(prior)
    memo.write_text(json.dumps(choice))
    keep_prior(path, prior)
    return choice


def quality(args) -> None:
    from personalization.atspeed.recommend import load_titles
    from personalization.atspeed.split import test_cases

    train_users = _users(args.data / "beauty.jsonl")
    eval_users = train_users if args.eval_data is None else _users(args.eval_data)
    cases = test_cases(eval_users)[: args.users]
    titles = load_titles(args.data / "beauty_items.json")
    work = _work(args)
    print(f"{len(cases)} users scored; {len(train_users)} users' histories train", flush=True)
    for method in args.methods:
        out = work / f"{method.replace(' ', '-')}.jsonl"
        done = _read(out)
        todo = [c for c in cases if c.user not in done]
        if not todo:
            continue
        t0 = time.perf_counter()
        if method == TARGET:
            from personalization.atspeed.code_target import HistoryPrior

            rec, trained = _recommender(args)
            fit = _target_choice(args, rec, train_users, trained.path)
            model = CodeRanker(rec, fit["exclude_purchased"], HistoryPrior(**fit["prior"]))
        else:
            model, fit = _baseline(args, method, train_users, titles)
        fit_s = time.perf_counter() - t0
        with out.open("a") as f:
            for c in tqdm(todo, desc=method, unit="user"):
                t0 = time.perf_counter()
                ranked = model.recommend(list(c.items), max(KS))
                row = {
                    "user": c.user,
                    "titles": ranked,
                    "s": time.perf_counter() - t0,
                    "fit_s": fit_s,
                    "fit": fit,
                }
                f.write(json.dumps(row) + "\n")
                f.flush()
    summarise(args)


def _drafts(args, rec, users):
    """AtSpeed-S and AtSpeed-R drafts of the code target (cached by setup)."""
    from personalization.atspeed.distill import DistillConfig, distill, teacher_data
    from personalization.atspeed.draft import Draft, DraftConfig
    from personalization.backbone.embedded import cache_dir

    windows = [u.history for u in users if len(u.history) >= 2][: args.teacher_users]
    prompts = [rec.prompt(h[:-1]) for h in windows]
    truths = [rec.tokens([h[-1]]) for h in windows]
    setup = {
        "target": rec.backbone.fingerprint,
        "codes": rec.codes.fingerprint,
        "users": len(windows),
        "beams": args.teacher_beams,
        "layers": args.draft_layers,
        "checkpoint": hashlib.sha256(Path(args.target_path).read_bytes()).hexdigest()[:12],
    }
    drafts, examples, report = {}, None, {}
    for method in ("atspeed-s", "atspeed-r"):
        cfg = DistillConfig(method=method, epochs=args.draft_epochs, top_k=args.teacher_beams)
        key = json.dumps({**setup, **asdict(cfg)}, sort_keys=True)
        path = (
            cache_dir()
            / "drafts"
            / f"codes-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"
        )
        if path.is_file():
            drafts[method], info = Draft.load(path, rec.backbone)
            report[method] = info
            continue
        if examples is None:
            t0 = time.perf_counter()
            examples = teacher_data(rec.model, prompts, truths, rec.catalogue, args.teacher_beams)
            report["teacher_s"] = time.perf_counter() - t0
        draft = Draft(rec.backbone, DraftConfig(layers=args.draft_layers))
        fit = distill(draft, examples, rec.catalogue, cfg)
        info = {"distill": asdict(cfg), "losses": fit.epochs, "seconds": fit.seconds}
        draft.save(path, info)
        drafts[method], report[method] = draft, info
        print(f"{method}: loss {fit.epochs} in {fit.seconds:.0f} s", flush=True)
    return drafts, report


def speed(args) -> None:
    from personalization.atspeed.code_target import HistoryPrior
    from personalization.atspeed.recommend import RecommendConfig, metrics
    from personalization.atspeed.split import test_cases

    rec, trained = _recommender(args)
    args.target_path = str(trained.path)
    users = _users(args.data / "beauty.jsonl")
    choice = _target_choice(args, rec, users, trained.path)
    exclude, rec.prior = choice["exclude_purchased"], HistoryPrior(**choice["prior"])
    drafts, draft_report = _drafts(args, rec, users)
    cases = [c for c in test_cases(users) if any(t in rec.index for t in c.items)]
    methods = {
        "beam": ("beam", None),
        "strict": ("speculative-strict", "atspeed-s"),
        "relaxed": ("speculative-relaxed", "atspeed-r"),
    }
    rows = []
    for K in SPEED_KS:
        runs = {m: [] for m in methods}
        for u, c in enumerate(tqdm(cases[: args.speed_users], desc=f"speed K={K}")):
            items = [t for t in c.items if t in rec.index]
            names = list(methods)[u % 3 :] + list(methods)[: u % 3]  # rotate the order
            for name in names:
                strategy, draft = methods[name]
                cfg = RecommendConfig(
                    strategy=strategy,
                    k=K,
                    gamma=args.gamma,
                    draft_beams=args.draft_beams * K,
                    seed=u,
                )
                t0 = time.perf_counter()
                found = rec.recommend(items, cfg, drafts.get(draft), exclude_purchased=exclude)
                runs[name].append((time.perf_counter() - t0, found))
        beam_s = sum(t for t, _ in runs["beam"])
        for name, results in runs.items():
            stats = [r.stats for _, r in results if r.stats is not None]
            drafted = sum(s.drafted_steps for s in stats)
            same = sum(
                _same(r.items[0], b.items[0])
                for (_, r), (_, b) in zip(results, runs["beam"], strict=True)
            )
            rows.append(
                {
                    "K": K,
                    "method": name,
                    "users": len(results),
                    "s_per_user": sum(t for t, _ in results) / len(results),
                    "speedup": beam_s / sum(t for t, _ in results),
                    "acceptance": sum(s.accepted_steps for s in stats) / drafted
                    if drafted
                    else None,
                    "identical": same / len(results),
                }
            )
    # relaxed recall at K = 20 on more users, against the same users' beam lists (quality phase)
    beam_lists = _read(_work(args) / f"{TARGET.replace(' ', '-')}.jsonl")
    recall_cases = [c for c in cases if c.user in beam_lists][: args.recall_users]
    relaxed = []
    for u, c in enumerate(tqdm(recall_cases, desc="relaxed recall@20")):
        items = [t for t in c.items if t in rec.index]
        cfg = RecommendConfig(
            strategy="speculative-relaxed",
            k=20,
            gamma=args.gamma,
            draft_beams=args.draft_beams * 20,
            seed=u,
        )
        found = rec.recommend(items, cfg, drafts["atspeed-r"], exclude_purchased=exclude)
        relaxed.append([i.title for i in found.items[0]])
    truths = [c.truth for c in recall_cases]
    beam20 = metrics([beam_lists[c.user]["titles"] for c in recall_cases], truths, 20)
    relaxed20 = metrics(relaxed, truths, 20)
    out = {
        "rows": rows,
        "drafts": draft_report,
        "relaxed_recall": {
            "users": len(recall_cases),
            "beam": beam20["recall@20"],
            "relaxed": relaxed20["recall@20"],
        },
        "config": {
            "gamma": args.gamma,
            "draft_beams": f"{args.draft_beams}·K",
            "draft_layers": args.draft_layers,
            "teacher_users": args.teacher_users,
            "teacher_beams": args.teacher_beams,
            "draft_epochs": args.draft_epochs,
            "exclude_purchased": exclude,
        },
    }
    (_work(args) / "speed.json").write_text(json.dumps(out, indent=1))
    summarise(args)


def _same(items, reference) -> bool:
    """The same items in the same order, scores equal up to float rounding."""
    return [i.title for i in items] == [i.title for i in reference] and all(
        abs(a.score - b.score) < 1e-4 for a, b in zip(items, reference, strict=True)
    )


# ---- results -------------------------------------------------------------------------------------
def _features_seconds(runs) -> float:
    """Seconds the backbone's features took when computed, as the target records on these codes
    measured it (the quickest uncomputed-cache run; a run that finds them cached measures a
    fraction of a second)."""
    codes = {json.loads(t.path.with_suffix(".json").read_text())["codes"] for _, t, _ in runs}
    seconds = [t.seconds["features"] for _, t, _ in runs]
    for record in runs[0][1].path.parent.glob("*.json"):
        row = json.loads(record.read_text())
        if isinstance(row, dict) and isinstance(row.get("codes"), str) and row["codes"] in codes:
            seconds.append(row["seconds"].get("features", 0.0))
    computed = [x for x in seconds if x > 5]
    return min(computed) if computed else max(seconds)


def summarise(args) -> None:
    from personalization.atspeed.recommend import ndcg_at, recall_at
    from personalization.atspeed.split import test_cases
    from personalization.training.evaluate import bootstrap_interval

    eval_users = _users(args.eval_data or args.data / "beauty.jsonl")
    cases = {c.user: c for c in test_cases(eval_users)[: args.users]}
    work = _work(args)
    per_user, methods = {}, {}
    for method in METHODS:
        rows = {
            u: r for u, r in _read(work / f"{method.replace(' ', '-')}.jsonl").items() if u in cases
        }
        if not rows:
            continue
        entry = {
            "users": len(rows),
            "s_per_user": sum(r["s"] for r in rows.values()) / len(rows),
            "fit_s": next(iter(rows.values()))["fit_s"],
            "fit": next(iter(rows.values()))["fit"],
        }
        for k in KS:
            for name, fn in ((f"recall@{k}", recall_at), (f"ndcg@{k}", ndcg_at)):
                scores = {u: fn(r["titles"], cases[u].truth, k) for u, r in rows.items()}
                per_user[(method, name)] = scores
                entry[name] = sum(scores.values()) / len(scores)
                entry[name + "_ci"] = bootstrap_interval(list(scores.values()))
        methods[method] = entry
    results = {
        "methods": methods,
        "config": {
            "data": str(args.eval_data or args.data / "beauty.jsonl"),
            "users": len(cases),
            "protocol": "AtSpeed: time split, input last ≤ 20 items (history + validation), "
            "truth all test items",
            "target": asdict(_sweep(args)[0][0]) if TARGET in methods else None,
            "search": "beam search over the code trie, 20 beams (lists for K = 5, 10, 20)",
        },
    }
    summary = {"users": len(cases)}
    if TARGET in methods:
        t = methods[TARGET]
        summary |= {"recall@10": t["recall@10"], "ndcg@10": t["ndcg@10"]}
        diffs = {}
        for b in BASELINES:
            if b not in methods:
                continue
            mine, theirs = per_user[(TARGET, "recall@10")], per_user[(b, "recall@10")]
            both = [u for u in mine if u in theirs]
            diffs[b] = {
                "recall@10_diff": sum(mine[u] - theirs[u] for u in both) / len(both),
                "recall@10_diff_ci": bootstrap_interval([mine[u] - theirs[u] for u in both]),
                "users": len(both),
            }
        results["paired_vs_target"] = diffs
        if diffs:
            best = max(diffs, key=lambda b: methods[b]["recall@10"])
            summary |= {
                "best_baseline": best,
                "best_baseline_recall@10": methods[best]["recall@10"],
                "recall@10_diff_ci": diffs[best]["recall@10_diff_ci"],
                "recall@10_ratio": t["recall@10"] / max(methods[best]["recall@10"], 1e-12),
            }
        runs = _sweep(args)
        results["target_training"] = [
            {
                "lr": cfg.lr,
                "best_valid_loss": loss,
                "chosen": i == 0,
                **json.loads(trained.path.with_suffix(".json").read_text()),
            }
            for i, (cfg, trained, loss) in enumerate(runs)
        ]
        # the backbone's features are computed once per codes and cached for every later run:
        # a target costs those features (as measured when they were computed) plus its epochs
        features = _features_seconds(runs)
        summary["train_minutes"] = (features + runs[0][1].seconds["train"]) / 60
        summary["sweep_minutes"] = (features + sum(t.seconds["train"] for _, t, _ in runs)) / 60
        summary["chosen_lr"] = runs[0][0].lr
        results["codes"] = {"config": asdict(_codes(args).config), **_codes(args).stats}
    speed_file = work / "speed.json"
    if speed_file.is_file():
        s = json.loads(speed_file.read_text())
        results["speed"] = s
        row = {(r["K"], r["method"]): r for r in s["rows"]}
        if (10, "strict") in row:
            summary |= {
                "strict_speedup@10": row[(10, "strict")]["speedup"],
                "strict_identical@10": row[(10, "strict")]["identical"],
                "latency_s@10": row[(10, "beam")]["s_per_user"],
            }
        if (20, "relaxed") in row:
            rr = s["relaxed_recall"]
            summary |= {
                "relaxed_speedup@20": row[(20, "relaxed")]["speedup"],
                # undefined (None) where beam search itself hit nothing on those users
                "relaxed_recall@20_ratio": rr["relaxed"] / rr["beam"] if rr["beam"] else None,
            }
    results["summary"] = summary
    write_results(results, args.out)
    harness.show(render, args.out)


def render(r: dict) -> str:
    """The results as markdown: the quality table, the speed table, the summary."""
    c = r["config"]
    lines = [f"{r['hardware']}; {r['date'][:10]}; {c['users']} users; {c['protocol']}", ""]
    head = " | ".join(f"Recall@{k} | NDCG@{k}" for k in KS)
    lines += [f"| method | users | {head} | s / user |", "|---|---|" + "---|" * (2 * len(KS) + 1)]
    for method, e in r["methods"].items():
        cells = " | ".join(
            f"{e[n]:.4f} [{e[n + '_ci'][0]:.4f}, {e[n + '_ci'][1]:.4f}]"
            for k in KS
            for n in (f"recall@{k}", f"ndcg@{k}")
        )
        lines.append(f"| {method} | {e['users']} | {cells} | {e['s_per_user']:.3f} |")
    if "speed" in r:
        lines += [
            "",
            "| K | method | users | s / user | speed-up | acceptance | identical to beam |",
            "|---|---|---|---|---|---|---|",
        ]
        for x in r["speed"]["rows"]:
            acc = "" if x["acceptance"] is None else f"{x['acceptance']:.2f}"
            lines.append(
                f"| {x['K']} | {x['method']} | {x['users']} | {x['s_per_user']:.3f} | "
                f"{x['speedup']:.2f}× | {acc} | {x['identical']:.2f} |"
            )
    summary = ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r["summary"].items()
    )
    return "\n".join([*lines, "", f"Summary: {summary}."])


def main() -> None:
    parser = harness.parser(__doc__, results=RESULTS)
    parser.add_argument("phase", choices=("codes", "train", "quality", "speed", "table"))
    parser.add_argument(
        "--eval-data",
        type=Path,
        default=None,
        help="score this Beauty-format file's users with models trained on --data",
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=[1e-3, 3e-3],
        help="learning rates tried; the best on validation loss is kept",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--users", type=int, default=None, help="score only the first N users")
    parser.add_argument(
        "--valid-users",
        type=int,
        default=300,
        help="validation users that choose the target's decoding rule",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--cornac-epochs", type=int, default=30)
    parser.add_argument("--speed-users", type=int, default=100)
    parser.add_argument("--recall-users", type=int, default=300)
    parser.add_argument("--gamma", type=int, default=3, help="steps drafted per verification")
    parser.add_argument("--draft-beams", type=int, default=2, help="N = this × K")
    parser.add_argument("--draft-layers", type=int, default=2)
    parser.add_argument("--teacher-users", type=int, default=300)
    parser.add_argument("--teacher-beams", type=int, default=10)
    parser.add_argument("--draft-epochs", type=int, default=3)
    parser.add_argument("--work", default=str(ROOT / ".bench/recommend"))
    args = parser.parse_args()
    phases = {
        "codes": codes,
        "train": train,
        "quality": quality,
        "speed": speed,
        "table": lambda a: harness.show(render, a.out),
    }
    phases[args.phase](args)


if __name__ == "__main__":
    main()
