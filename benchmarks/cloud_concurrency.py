"""How many devices one cloud serves: tokens/s and time per token at 1–32 sessions (issue 18).

A real cloud (`spa cloud`, its own process, the step scheduler batching its sessions' passes) and
N httpx devices in this process, started together; each generates 32 greedy tokens from a
PersonaChat test prompt — `base` (no device contact) and `spa` (the device answers side requests
with its trained side network). Per N: tokens/s over all sessions (first token of the first
session → last token of the last) ÷ that of one session, and p50 / p95 of the time between a
session's tokens. Then a soak: 32 devices for 60 s, mixed base / spa / sampling, counting
sessions finished, errors by HTTP status and responses ≥ 500.

    python benchmarks/cloud_concurrency.py [--sessions 1 2 4 8 16 32] [--soak-s 60]
    python benchmarks/cloud_concurrency.py table

Writes benchmarks/results/cloud_concurrency.json (figures, config, hardware, date).
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import write_results
from personalization.config import DEFAULT_TAP_ENCODING

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks/results/cloud_concurrency.json"
TOPICS = (
    "the sea",
    "bread",
    "winter",
    "trains",
    "bees",
    "chess",
    "rivers",
    "music",
    "the moon",
    "gardens",
    "clocks",
    "rain",
    "mountains",
    "paper",
    "owls",
    "bridges",
    "tea",
    "maps",
    "volcanoes",
    "violins",
    "deserts",
    "libraries",
    "glass",
    "whales",
    "kites",
    "salt",
    "lighthouses",
    "honey",
    "snow",
    "forests",
    "bicycles",
    "stars",
)


def _generate(url, token, model, prompt, setting, decode) -> tuple[list[float], int]:
    """One device's session: the arrival time of each token, and the tokens."""
    from device_agent.client import CloudClient
    from device_agent.generation import RemoteGeneration

    with CloudClient(url, token) as client:
        run = RemoteGeneration(
            client, model if setting != "base" else None, prompt, setting, decode, deadline_s=60.0
        )
        times = [time.perf_counter() for _ in run]
    return times, len(times)


def _cell(url, token, model, prompts, setting, n, decode) -> dict:
    """N devices at once; tokens/s over the whole cell and the gaps between tokens."""
    barrier, out, errors = threading.Barrier(n + 1), [None] * n, []

    def work(i: int) -> None:
        barrier.wait()
        try:
            out[i] = _generate(url, token, model, prompts[i % len(prompts)], setting, decode)
        except Exception as exc:  # counted and reported
            errors.append(f"{type(exc).__name__}: {exc}"[:200])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    done = [o for o in out if o]
    tokens = sum(k for _, k in done)
    last = max(times[-1] for times, _ in done)
    gaps = [b - a for times, _ in done for a, b in zip(times, times[1:], strict=False)]
    return {
        "sessions": n,
        "tokens": tokens,
        "wall_s": last - started,
        "tokens_per_s": tokens / (last - started),
        "p50_ms": 1e3 * statistics.median(gaps),
        "p95_ms": 1e3 * _p95(gaps),
        "errors": errors,
    }


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def _soak(url, token, model, prompts, devices: int, seconds: float) -> dict:
    """`devices` devices, each running sessions back to back until `seconds` pass."""
    from device_agent.errors import CloudError
    from personalization.config import DecodeConfig

    stop_at = time.monotonic() + seconds
    finished, errors, statuses, lock = Counter(), [], Counter(), threading.Lock()

    def work(i: int) -> None:
        k = 0
        while time.monotonic() < stop_at:
            setting = ("base", "spa")[k % 2]
            decode = DecodeConfig(
                strategy="sample" if k % 3 == 2 else "greedy",
                max_new_tokens=8 + (i + k) % 17,
                seed=i * 1000 + k,
            )
            try:
                _generate(url, token, model, prompts[(i + k) % len(prompts)], setting, decode)
                with lock:
                    finished[setting] += 1
            except CloudError as exc:
                with lock:
                    statuses[exc.status] += 1
                time.sleep(0.5)
            except Exception as exc:  # any other failure is an error too
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
            k += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(devices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "devices": devices,
        "seconds": seconds,
        "finished": dict(finished),
        "http_errors": {str(k): v for k, v in statuses.items()},
        "responses_5xx": sum(v for k, v in statuses.items() if k >= 500),
        "errors": errors[:20],
        "error_count": len(errors),
    }


def run(args) -> None:
    import httpx

    from app.cloud_process import cloud
    from personalization.backbone.loading import load_backbone
    from personalization.config import DecodeConfig
    from personalization.training.checkpoint import load_checkpoint

    backbone = load_backbone(args.backbone)
    if args.prompts == "personachat":  # long: persona and dialogue history, up to 384 tokens
        data = harness.splits(
            backbone, args.data, "personachat", train=40, valid=20, test=40, tokens=384
        )
        prompts = [list(e.prompt) for e in data.test]
    else:  # short chat questions (about 30 tokens with the chat template)
        prompts = [backbone.encode_prompt(f"Tell me something about {t}.") for t in TOPICS]
    model = load_checkpoint(Path(args.checkpoint), backbone)[0].eval()
    _ = model.codec  # the public basis, loaded before timing
    decode = DecodeConfig(max_new_tokens=args.tokens)
    results = {
        "cells": {},
        "config": {
            "backbone": backbone.name,
            "tokens": args.tokens,
            "sessions": args.sessions,
            "max_batch": args.max_batch,
            "checkpoint": Path(args.checkpoint).name,
            "prompts": args.prompts,
            "prompt_tokens": statistics.mean(len(p) for p in prompts),
        },
    }
    work = Path(args.work)
    os.environ["SPA_CLOUD_MAX_SESSIONS"] = "64"  # the cloud process reads its limits from these
    os.environ["SPA_CLOUD_MAX_BATCH"] = str(args.max_batch)
    with cloud(args.backbone, work) as url:
        token = httpx.post(f"{url}/v1/devices", json={"name": "concurrency"}).json()["token"]
        headers = {"Authorization": f"Bearer {token}"}
        httpx.get(f"{url}/v1/codec/{DEFAULT_TAP_ENCODING}", headers=headers, timeout=600)
        _cell(url, token, model, prompts, "base", 2, DecodeConfig(max_new_tokens=4))  # warm
        for setting in ("base", "spa"):
            cells = results["cells"].setdefault(setting, {})
            for n in args.sessions:
                cells[str(n)] = c = _cell(url, token, model, prompts, setting, n, decode)
                c["speedup"] = c["tokens_per_s"] / cells["1"]["tokens_per_s"]
                c["p95_vs_alone"] = c["p95_ms"] / cells["1"]["p95_ms"]
                print(
                    f"{setting} × {n}: {c['tokens_per_s']:.1f} tokens/s ({c['speedup']:.2f}×), "
                    f"p50 {c['p50_ms']:.0f} ms, p95 {c['p95_ms']:.0f} ms, "
                    f"{len(c['errors'])} errors",
                    flush=True,
                )
                write_results(results, args.out)
        if args.soak_s:
            results["soak"] = _soak(url, token, model, prompts, args.soak_devices, args.soak_s)
            print(f"soak: {json.dumps(results['soak'])}", flush=True)
            metrics = httpx.get(f"{url}/metrics").text
            results["soak"]["metrics"] = [
                line for line in metrics.splitlines() if line.startswith("spa_")
            ]
    write_results(results, args.out)


def render(r: dict) -> str:
    """The results as Markdown (the docs' results page)."""
    headers = ["setting", "sessions", "tokens/s", "× 1 session", "p50 ms / token",
               "p95 ms / token", "p95 ÷ alone", "errors"]  # fmt: skip
    rows = [
        [
            setting,
            n,
            f"{c['tokens_per_s']:.1f}",
            f"{c['speedup']:.2f}",
            f"{c['p50_ms']:.0f}",
            f"{c['p95_ms']:.0f}",
            f"{c['p95_vs_alone']:.2f}",
            len(c["errors"]),
        ]  # fmt: skip
        for setting, cells in r["cells"].items()
        for n, c in cells.items()
    ]
    text = harness.table(headers, rows)
    if "soak" in r:
        s = r["soak"]
        text += (
            f"\n\nSoak: {s['devices']} devices × {s['seconds']:.0f} s: sessions finished "
            f"{s['finished']}, HTTP errors {s['http_errors'] or 'none'}, responses ≥ 500: "
            f"{s['responses_5xx']}, other errors: {s['error_count']}."
        )
    return text


def main() -> None:
    parser = harness.parser(__doc__, work=".bench/concurrency", phases=("run",), results=RESULTS)
    parser.add_argument(
        "--checkpoint",
        default=str(ROOT / f".bench/wire/personachat-spa-{DEFAULT_TAP_ENCODING}.safetensors"),
        help="the devices' spa checkpoint (benchmarks/wire.py quality trains it)",
    )
    parser.add_argument("--sessions", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument(
        "--prompts",
        choices=("short", "personachat"),
        default="short",
        help="short chat questions, or PersonaChat's test prompts (long: prefill dominates)",
    )
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--soak-s", type=float, default=60.0)
    parser.add_argument("--soak-devices", type=int, default=32)
    harness.run(parser, render, run=run)


if __name__ == "__main__":
    main()
