"""Speculative beam search (AtSpeed) on SmolLM2 + Amazon Beauty: quality, speed-up, acceptance.

    python benchmarks/speculative_beam.py [--users 10] [--ks 1 5 10 20] [--gamma 5]
        [--draft-beams 1.0] [--draft-layers 2] [--train-users 96] [--teacher-beams 5]
        [--epochs 2] [--draft-dir DIR] [--data ../shared/data]

The target is the one `spa train-target` trained last (`--target`; or the backbone alone,
`--target zero-shot`), recommending the next purchase of its held-out Beauty test users under
the catalogue trie. One run prints, for each K, side by side: the target's own beam
search (the reference), strict and relaxed speculative search with drafts aligned by AtSpeed-S
and AtSpeed-R, the same with the untrained draft ("tree attention only"), and the token tree
without any draft (γ = 0). Every method runs for every user in turn, rotating the order, so
machine drift affects all alike; times are wall clock per user, prompt pass included.

Drafts are distilled on the target's training users from the target's own beam search and
cached under --draft-dir (default $SPA_CACHE_DIR/drafts); a later run reuses them. The rows go to
benchmarks/results/speculative_beam.json as well.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _hardware import hardware, write_results  # noqa: E402

from personalization.atspeed.catalogue import Catalogue  # noqa: E402
from personalization.atspeed.distill import DistillConfig, distill, teacher_data  # noqa: E402
from personalization.atspeed.draft import Draft, DraftConfig  # noqa: E402
from personalization.atspeed.recommend import (  # noqa: E402
    RecommendConfig,
    load_titles,
    metrics,
    recommend,
)
from personalization.atspeed.target import TargetConfig, default_target  # noqa: E402
from personalization.backbone.embedded import cache_dir  # noqa: E402
from personalization.backbone.loading import load_backbone  # noqa: E402
from personalization.config import SPAConfig  # noqa: E402
from personalization.model import SPAModel  # noqa: E402
from personalization.training.checkpoint import load_checkpoint  # noqa: E402
from personalization.training.data import encode_target, load_splits, to_example  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results" / "speculative_beam.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smollm2")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--users", type=int, default=10, help="held-out test users")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--gamma", type=int, default=5, help="steps drafted per verification")
    parser.add_argument("--draft-beams", type=float, default=1.0, help="N = this × K")
    parser.add_argument("--draft-layers", type=int, default=2)
    parser.add_argument("--train-users", type=int, default=96, help="users of the teacher data")
    parser.add_argument("--teacher-beams", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--draft-dir", type=Path, default=None)
    parser.add_argument(
        "--target", default="default",
        help="a checkpoint, 'zero-shot', or 'default': the target `spa train-target` trained last",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    start = time.perf_counter()

    backbone = load_backbone(args.backbone)
    catalogue = Catalogue.from_titles(backbone, load_titles(args.data / "beauty_items.json"))
    held = TargetConfig()  # the trained target's split: its test users, then its training users
    splits = load_splits(args.data / "beauty.jsonl", "beauty", test=held.test_users,
                         valid=held.valid_users, train=args.train_users)  # fmt: skip
    path = default_target(backbone) if args.target == "default" else args.target
    if path in (None, "zero-shot"):
        target, args.target = SPAModel(backbone, SPAConfig(setting="base")), "zero-shot"
    else:
        target = load_checkpoint(Path(path), backbone)[0].eval()
        args.target = f"{Path(path).name} ({target.setting})"
    tests = [(list(to_example(backbone, r, keep="end").prompt), r.output)
             for r in splits.test[: args.users]]  # fmt: skip

    drafts = {"untrained": Draft(backbone, DraftConfig(layers=args.draft_layers))}
    last = list({r.user: r for r in splits.train}.values())  # one prompt per training user
    drafts |= aligned_drafts(args, backbone, target, catalogue, last)

    N = args.draft_beams
    methods = {
        "target beam search": ("beam", None, 0),
        "strict, AtSpeed-S draft": ("speculative-strict", "atspeed-s", args.gamma),
        "relaxed, AtSpeed-R draft": ("speculative-relaxed", "atspeed-r", args.gamma),
        "strict, tree attention only": ("speculative-strict", "untrained", args.gamma),
        "relaxed, tree attention only": ("speculative-relaxed", "untrained", args.gamma),
        "strict, no draft (γ = 0)": ("speculative-strict", None, 0),
    }
    rows = []
    for K in args.ks:
        runs = {name: [] for name in methods}
        for u, (prompt, truth) in enumerate(tests):
            names = list(methods)
            names = names[u % len(names) :] + names[: u % len(names)]  # rotate the order
            for name in names:
                strategy, draft, gamma = methods[name]
                cfg = RecommendConfig(
                    strategy=strategy, k=K, gamma=gamma, draft_beams=max(K, round(N * K)), seed=u
                )
                t0 = time.perf_counter()
                result = recommend(target, catalogue, [prompt], cfg, drafts.get(draft))
                runs[name].append((time.perf_counter() - t0, result, truth))
        rows += summarise(K, runs, catalogue)
    print(report(args, backbone, catalogue, tests, drafts, rows, time.perf_counter() - start))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_results({"rows": rows, "config": config, "catalogue": len(catalogue)}, args.out)


def aligned_drafts(args, backbone, target, catalogue, train) -> dict[str, Draft]:
    """AtSpeed-S and AtSpeed-R drafts: loaded from the cache, else distilled (and cached)."""
    root = args.draft_dir or cache_dir() / "drafts"
    configs = {
        m: DistillConfig(method=m, epochs=args.epochs, lr=args.lr)
        for m in ("atspeed-s", "atspeed-r")
    }
    setup = {"users": [r.user for r in train], "teacher_beams": args.teacher_beams,
             "layers": args.draft_layers, "backbone": backbone.fingerprint,
             "target": args.target}  # fmt: skip
    out, examples = {}, None
    for method, cfg in configs.items():
        key = json.dumps({**setup, **asdict(cfg)}, sort_keys=True)
        path = root / f"{method}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"
        if path.is_file():
            out[method] = Draft.load(path, backbone)[0]
            continue
        if examples is None:
            t0 = time.perf_counter()
            prompts = [list(to_example(backbone, r, keep="end").prompt) for r in train]
            truths = [encode_target(backbone, r.output) for r in train]
            draft = Draft(backbone, DraftConfig(layers=args.draft_layers))
            examples = teacher_data(target, prompts, truths, catalogue, args.teacher_beams, draft)
            print(f"teacher data: {len(examples)} users, {args.teacher_beams} beams, "
                  f"{sum(len(e.prefixes) for e in examples)} branching prefixes, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
        draft = Draft(backbone, DraftConfig(layers=args.draft_layers))
        fit = distill(draft, examples, catalogue, cfg)
        draft.save(path, {"distill": asdict(cfg), "losses": fit.epochs, "seconds": fit.seconds})
        losses = " → ".join(f"{x:.3f}" for x in fit.epochs)
        print(f"distilled {method}: loss {losses} in {fit.seconds:.0f} s → {path}", flush=True)
        out[method] = draft
    return out


def summarise(K: int, runs: dict, catalogue: Catalogue) -> list[dict]:
    reference = runs["target beam search"]
    base_time = sum(t for t, _, _ in reference)
    rows = []
    for name, results in runs.items():
        titles = [[i.title for i in r.items[0]] for _, r, _ in results]
        quality = metrics(titles, [truth for _, _, truth in results], K)
        seconds = sum(t for t, _, _ in results)
        stats = [r.stats for _, r, _ in results if r.stats is not None]
        drafted = sum(s.drafted_steps for s in stats)
        steps = sum(s.target_steps for s in stats) if stats else None
        passes = sum(r.target_passes for _, r, _ in results)
        same = sum(
            _same(r.items[0], ref.items[0])
            for (_, r, _), (_, ref, _) in zip(results, reference, strict=True)
        )
        rows.append({
            "K": K, "method": name, **quality, "s/user": seconds / len(results),
            "speed-up": base_time / seconds,
            "accept": sum(s.accepted_steps for s in stats) / drafted if drafted else None,
            "steps/pass": (steps if steps is not None else passes) / passes,
            "same": f"{same}/{len(results)}",
        })  # fmt: skip
    return rows


def _same(items, reference) -> bool:
    """The same titles in the same order, scores equal up to float rounding."""
    return [i.title for i in items] == [i.title for i in reference] and all(
        abs(a.score - b.score) < 1e-4 for a, b in zip(items, reference, strict=True)
    )


def report(args, backbone, catalogue, tests, drafts, rows, seconds) -> str:
    prompt_tokens = sum(len(p) for p, _ in tests) / len(tests)
    lines = [
        f"hardware: {hardware()}",
        f"target: {args.target} on {backbone.name} (L={backbone.num_layers}, "
        f"H={backbone.hidden_size}, "
        f"{backbone.num_parameters / 1e6:.1f} M parameters); draft: its first "
        f"{args.draft_layers} layers + shared embeddings/head "
        f"({drafts['untrained'].num_parameters / 1e6:.1f} M own parameters)",
        f"catalogue: {len(catalogue)} titles, trie of {catalogue.num_nodes} nodes, longest "
        f"{catalogue.max_length} tokens; {len(tests)} test users, prompts {prompt_tokens:.0f} "
        f"tokens on average",
        f"speculative: γ = {args.gamma}, N = {args.draft_beams:g}·K draft beams; drafts "
        f"distilled on {args.train_users} other users (teacher: the target's {args.teacher_beams}"
        f"-beam search), α = 0.7, {args.epochs} epochs",
        "",
        f"{'K':>3}  {'method':<30}{'Recall':>8}{'NDCG':>8}{'s/user':>8}{'speed-up':>10}"
        f"{'accept':>8}{'steps/pass':>11}{'= beam':>8}",
    ]
    for r in rows:
        accept = "" if r["accept"] is None else f"{r['accept']:.2f}"
        recall, ndcg = r[f"recall@{r['K']}"], r[f"ndcg@{r['K']}"]
        lines.append(
            f"{r['K']:>3}  {r['method']:<30}{recall:>8.3f}{ndcg:>8.3f}{r['s/user']:>8.2f}"
            f"{r['speed-up']:>9.2f}×{accept:>8}{r['steps/pass']:>11.2f}{r['same']:>8}"
        )
    lines += [
        "",
        "accept: share of drafted steps the target accepted; steps/pass: beam search steps per "
        "target forward pass (prompt pass included); = beam: users whose top-K titles and "
        "scores equal the target's own beam search.",
        f"total time {seconds / 60:.1f} min",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
