"""Run-ahead against synchronous SPA and the backbone alone, through the emulated link (issue 24).

A real cloud (`spa cloud`, its own process) and a device: for every profile, `base`, synchronous
`spa` (pull, the measured-best tap encoding) and run-ahead `spa` generate the same test prompts,
side by side in one run. Per mode: the user's wait per token (stream opened → last token ÷
tokens, one clock for every mode), T_total per token as the device's books count it, the first
token, corrections and withdrawn drafts per token, bytes per token. Then quality: the same
checkpoint, synchronous and run-ahead, greedy, on test examples of XSum and PersonaChat (Rouge-L
with bootstrap 95 % intervals, and how many outputs are identical).

    python benchmarks/run_ahead.py cost        (on a quiet machine)
    python benchmarks/run_ahead.py quality
    python benchmarks/run_ahead.py table

Checkpoints: `benchmarks/wire.py quality` trains them (`.bench/wire/<dataset>-spa-<encoding>`).
Writes benchmarks/results/run_ahead.json (figures, config, hardware, date).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import write_results
from personalization.config import DEFAULT_TAP_ENCODING

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks/results/run_ahead.json"
PROFILES = ("fiber", "lte", "4g", "3g")
MODES = ("base", "spa", "spa run-ahead")
DEADLINE_S = 60.0  # a fallback would hide what the link costs


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _setup(args):
    """The backbone, the dataset's test prompts (as `spa eval` splits them) and the checkpoint."""
    from personalization.backbone.loading import load_backbone
    from personalization.training.checkpoint import load_checkpoint

    backbone = load_backbone(args.backbone)
    data = harness.splits_of(backbone, args, args.dataset)
    ckpt = Path(args.work) / f"{args.dataset}-spa-{args.encoding}.safetensors"
    model = load_checkpoint(ckpt, backbone)[0].eval()
    return backbone, data, model


def _run(client, model, prompt, decode, mode) -> dict:
    """One generation; its timings on the device's clock."""
    from device_agent.generation import RemoteGeneration

    setting = "base" if mode == "base" else "spa"
    tap_mode = "run-ahead" if mode == "spa run-ahead" else (None if mode == "base" else "pull")
    run = RemoteGeneration(
        client,
        None if mode == "base" else model,
        prompt,
        setting,
        decode,
        tap_mode=tap_mode,
        deadline_s=DEADLINE_S,
    )
    started, times, ids = time.perf_counter(), [], []
    for token in run:
        times.append(time.perf_counter() - started)
        ids.append(token.id)
    a = run.accounts
    return {
        "ids": ids,
        "tokens": a.tokens,
        "wall_s": times[-1] if times else 0.0,
        "first_s": times[0] if times else 0.0,
        "t_total_s": a.t_total,
        "corrections": a.corrections,
        "withdrawn": a.withdrawn,
        "contacts": a.contacts,
        "bytes": a.bytes_to_device + a.bytes_from_device,
    }


def cost(args) -> None:
    import httpx
    import torch

    from app.cloud_process import cloud
    from device_agent.client import CloudClient
    from personalization.config import DecodeConfig
    from personalization.latency import profile

    results = _load(args.out)
    cells = results.setdefault("cost", {})
    backbone, data, model = _setup(args)
    prompts = [list(e.prompt) for e in data.test[: args.prompts]]
    decode = DecodeConfig(max_new_tokens=args.tokens)
    results.setdefault("config", {})["cost"] = {
        "backbone": backbone.name,
        "dataset": args.dataset,
        "encoding": args.encoding,
        "prompts": len(prompts),
        "max_new_tokens": args.tokens,
        "profiles": list(args.profiles),
        "threshold": model.config.threshold,
        "deadline_s": DEADLINE_S,
        "pinned": "cloud on core 0, device on core 1, 1 thread each" if args.pin else None,
    }
    if args.pin:  # two machines: the cloud on core 0, the device on core 1, one thread each
        os.environ["OMP_NUM_THREADS"] = "1"
        os.sched_setaffinity(0, {0})  # the cloud process inherits it
    with cloud(args.backbone, Path(args.work) / "cloud") as url:
        if args.pin:
            os.sched_setaffinity(0, {1})
            torch.set_num_threads(1)
        token = httpx.post(f"{url}/v1/devices", json={"name": "run-ahead"}).json()["token"]
        headers = {"Authorization": f"Bearer {token}"}
        httpx.get(f"{url}/v1/codec/{args.encoding}", headers=headers, timeout=600)  # warm
        _ = model.codec
        for name in args.profiles:
            if name in cells:
                print(f"{name}: done, skipped", flush=True)
                continue
            runs: dict[str, list[dict]] = {m: [] for m in MODES}
            with CloudClient(url, token, profile=profile(name)) as client:
                for prompt in prompts:  # the modes interleaved, prompt by prompt
                    for mode in MODES:
                        runs[mode].append(_run(client, model, prompt, decode, mode))
            cells[name] = {mode: _summary(r) for mode, r in runs.items()}
            same = [
                a["ids"] == b["ids"]
                for a, b in zip(runs["spa"], runs["spa run-ahead"], strict=True)
            ]
            cells[name]["identical_outputs"] = f"{sum(same)}/{len(same)}"
            base = cells[name]["base"]
            for mode in MODES:
                c = cells[name][mode]
                c["wait_vs_base"] = c["wait_ms"] / base["wait_ms"]
                c["t_total_vs_base"] = c["t_total_ms"] / base["t_total_ms"]
            print(
                f"{name}: "
                + ", ".join(
                    f"{m} {cells[name][m]['wait_ms']:.1f} ms/token "
                    f"({cells[name][m]['wait_vs_base']:.2f}x)"
                    for m in MODES
                )
                + f"; identical {cells[name]['identical_outputs']}",
                flush=True,
            )
            write_results(results, args.out)


def _summary(runs: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in runs) or 1
    return {
        "tokens": tokens,
        "wait_ms": 1e3 * sum(r["wall_s"] for r in runs) / tokens,
        "t_total_ms": 1e3 * sum(r["t_total_s"] for r in runs) / tokens,
        "first_token_ms": 1e3 * sum(r["first_s"] for r in runs) / len(runs),
        "corrections_per_token": sum(r["corrections"] for r in runs) / tokens,
        "withdrawn_per_token": sum(r["withdrawn"] for r in runs) / tokens,
        "contacts_per_token": sum(r["contacts"] for r in runs) / tokens,
        "bytes_per_token": sum(r["bytes"] for r in runs) / tokens,
    }


def quality(args) -> None:
    import httpx

    from app.cloud_process import cloud
    from device_agent.client import CloudClient
    from personalization.config import DecodeConfig
    from personalization.training.evaluate import bootstrap_interval, rouge_l

    results = _load(args.out)
    cells = results.setdefault("quality", {})
    if args.dataset in cells:
        print(f"{args.dataset}: done, skipped")
        return
    backbone, data, model = _setup(args)
    examples = data.test[: args.quality_examples]
    decode = DecodeConfig(max_new_tokens=args.quality_tokens)
    with cloud(args.backbone, Path(args.work) / "cloud") as url:
        token = httpx.post(f"{url}/v1/devices", json={"name": "run-ahead-q"}).json()["token"]
        with CloudClient(url, token) as client:
            outputs = {"spa": [], "spa run-ahead": []}
            for i, example in enumerate(examples):
                for mode in outputs:
                    outputs[mode].append(_run(client, model, list(example.prompt), decode, mode))
                print(f"{args.dataset}: {i + 1}/{len(examples)}", flush=True)
    cell = {"examples": len(examples), "max_new_tokens": args.quality_tokens}
    for mode, runs in outputs.items():
        scores = [
            rouge_l(backbone.decode(list(e.target)), backbone.decode(r["ids"]))
            for r, e in zip(runs, examples, strict=True)
        ]
        low, high = bootstrap_interval(scores)
        cell[mode] = {
            "rouge_l": sum(scores) / len(scores),
            "rouge_l_ci": [low, high],
            "corrections_per_token": sum(r["corrections"] for r in runs)
            / max(1, sum(r["tokens"] for r in runs)),
        }
    same = [
        a["ids"] == b["ids"] for a, b in zip(outputs["spa"], outputs["spa run-ahead"], strict=True)
    ]
    cell["identical_outputs"] = f"{sum(same)}/{len(same)}"
    cells[args.dataset] = cell
    print(json.dumps(cell), flush=True)
    write_results(results, args.out)


def render(r: dict) -> str:
    """The results as Markdown (the docs' results page)."""
    headers = ["profile", "mode", "wait ms / token", "÷ base", "T_total ms / token (books)",
               "÷ base", "first token ms", "corrections / token", "withdrawn / token",
               "bytes / token"]  # fmt: skip
    rows = [
        [
            name,
            mode,
            f"{c['wait_ms']:.1f}",
            f"{c['wait_vs_base']:.2f}",
            f"{c['t_total_ms']:.1f}",
            f"{c['t_total_vs_base']:.2f}",
            f"{c['first_token_ms']:.0f}",
            f"{c['corrections_per_token']:.2f}",
            f"{c['withdrawn_per_token']:.2f}",
            f"{c['bytes_per_token']:,.0f}",
        ]  # fmt: skip
        for name, cells in r.get("cost", {}).items()
        for mode, c in ((m, cells[m]) for m in MODES)
    ]
    text = harness.table(headers, rows)
    if r.get("quality"):
        ci = "{0[rouge_l]:.2f} [{0[rouge_l_ci][0]:.2f}, {0[rouge_l_ci][1]:.2f}]".format
        quality = [
            [
                dataset,
                c["examples"],
                ci(c["spa"]),
                ci(c["spa run-ahead"]),
                c["identical_outputs"],
                f"{c['spa run-ahead']['corrections_per_token']:.2f}",
            ]  # fmt: skip
            for dataset, c in r["quality"].items()
        ]
        text += "\n\n" + harness.table(
            [
                "dataset",
                "examples",
                "spa Rouge-L [95 % CI]",
                "run-ahead Rouge-L [95 % CI]",
                "identical outputs",
                "corrections / token",
            ],  # fmt: skip
            quality,
        )
    return text


def main() -> None:
    parser = harness.parser(
        __doc__, work=".bench/wire", phases=("cost", "quality"), results=RESULTS
    )
    parser.add_argument("--dataset", default="personachat")
    parser.add_argument("--encoding", default=DEFAULT_TAP_ENCODING)
    parser.add_argument("--train-size", type=int, default=40, help="as the checkpoint's split")
    parser.add_argument("--valid-size", type=int, default=20)
    parser.add_argument("--test-size", type=int, default=40)
    parser.add_argument("--max-prompt-tokens", type=int, default=384)
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES))
    parser.add_argument("--prompts", type=int, default=3, help="test prompts per profile")
    parser.add_argument("--tokens", type=int, default=24, help="tokens per cost generation")
    parser.add_argument("--quality-examples", type=int, default=30)
    parser.add_argument("--quality-tokens", type=int, default=48)
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cost: the cloud and the device on one core each, as two machines (run-ahead runs "
        "them at the same time; sharing both cores would charge it the other's compute)",
    )
    harness.run(parser, render, cost=cost, quality=quality)


if __name__ == "__main__":
    main()
