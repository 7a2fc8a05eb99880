"""What each tap encoding costs on the wire and in quality (issue 17), on the real backbone.

Two phases, each resumable (finished cells are skipped; progress in the log):

* `quality` — per dataset (XSum, PersonaChat), one `spa` side network trained per tap encoding
  from the same cached backbone features (the encoding's round trip applied in training, as when
  serving), its gate calibrated to the budget on validation data, then Rouge-L (bootstrap 95 %
  interval), usage and bytes per token on the test split; `base` beside them.
* `cost` — a real cloud (`spa cloud`, its own process) and a device through the emulated link:
  bytes per tap position, bytes per generated token (prompt included), first-device-token latency
  and T_total(spa) ÷ T_total(base) per network profile, measured side by side in one run.

    python benchmarks/wire.py quality --data ../shared/data      (long: run it in the background)
    python benchmarks/wire.py cost --data ../shared/data         (on a quiet machine)
    python benchmarks/wire.py table                              (the README's table)

Writes benchmarks/results/wire.json (figures, config, hardware, date).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import write_results
from personalization.config import TAP_ENCODINGS, TAP_MODES

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks/results/wire.json"
DATASETS = ("xsum", "personachat")
PROFILES = ("fiber", "lte", "4g", "3g")
#: the cloud's longest wait for g(x): fp16 prompt taps take seconds on 3g, and a fallback would
#: hide what the link costs
DEADLINE_S = 60.0


def _load(path: Path = RESULTS) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"quality": {}, "cost": {}}


def _save(results: dict, config: dict, path: Path = RESULTS) -> None:
    results.setdefault("config", {}).update(config)
    write_results(results, path)


def _data(backbone, dataset: str, args: argparse.Namespace):
    """The dataset's seeded splits, as `spa train` / `spa eval` make them."""

    return harness.splits_of(backbone, args, dataset)


def quality(args: argparse.Namespace) -> None:
    from personalization.backbone.loading import load_backbone
    from personalization.latency import profile
    from personalization.model import SPAModel
    from personalization.training.experiment import assess, fit
    from personalization.training.train import TrainConfig

    results, backbone = _load(args.out), load_backbone(args.backbone)
    config = {
        "backbone": backbone.name,
        "train_size": args.train_size,
        "valid_size": args.valid_size,
        "test_size": args.test_size,
        "epochs": args.epochs,
        "lr": args.lr,
        "target_usage": args.target_usage,
        "max_prompt_tokens": args.max_prompt_tokens,
    }
    work = Path(args.work)
    for dataset in args.datasets:
        data = _data(backbone, dataset, args)
        cells = results["quality"].setdefault(dataset, {})
        for encoding in ("base", *args.encodings):
            if encoding in cells:
                print(f"{dataset} {encoding}: done, skipped", flush=True)
                continue
            started = time.perf_counter()
            if encoding == "base":
                from personalization.config import SPAConfig

                model = SPAModel(backbone, SPAConfig(setting="base"))
                report, _ = assess(model, data, profile("lte"), progress=False)
            else:
                out = work / f"{dataset}-spa-{encoding}.safetensors"
                cfg = TrainConfig(epochs=args.epochs, lr=args.lr, target_usage=args.target_usage)
                model = fit(
                    backbone,
                    data,
                    "spa",
                    cfg,
                    out,
                    tap_encoding=encoding,
                    resume=True,
                    cache_root=args.cache,
                    calibration_prompts=10,
                    progress=False,
                ).model
                report, _ = assess(
                    model,
                    data,
                    profile("lte"),
                    target_usage=args.target_usage,
                    cache_root=args.cache,
                    progress=False,
                )
            low, high = report.rouge_l_interval()
            cells[encoding] = asdict(report) | {
                "rouge_l_ci": [low, high],
                "tap_bytes": None if encoding == "base" else model.tap_bytes,
                "seconds": time.perf_counter() - started,
                "config": config,
            }
            print(
                f"{dataset} {encoding}: Rouge-L {report.rouge_l:.2f} [{low:.2f}, {high:.2f}], "
                f"usage {report.usage:.2f}, {report.bytes_per_token:,.0f} B/token "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
            _save(results, {"quality": config}, args.out)


def cost(args: argparse.Namespace) -> None:
    """Every encoding × mode through a real cloud and the emulated link, `base` beside them."""
    import httpx

    from app.cloud_process import cloud
    from device_agent.client import CloudClient
    from device_agent.generation import RemoteGeneration
    from personalization.backbone.loading import load_backbone
    from personalization.config import DecodeConfig
    from personalization.latency import profile
    from personalization.training.checkpoint import load_checkpoint

    results, backbone = _load(args.out), load_backbone(args.backbone)
    data = _data(backbone, args.cost_dataset, args)
    prompts = [list(e.prompt) for e in data.test[: args.prompts]]
    decode = DecodeConfig(max_new_tokens=args.tokens)
    config = {
        "dataset": args.cost_dataset,
        "prompts": len(prompts),
        "max_new_tokens": args.tokens,
        "profiles": list(args.profiles),
        "target_usage": args.target_usage,
    }
    cells = results.setdefault("cost", {})
    work = Path(args.work)
    with cloud(args.backbone, work / "cloud") as url:
        token = httpx.post(f"{url}/v1/devices", json={"name": "wire-bench"}).json()["token"]
        for encoding in args.encodings:  # warm: both sides fit the public basis once, untimed
            headers = {"Authorization": f"Bearer {token}"}
            httpx.get(f"{url}/v1/codec/{encoding}", headers=headers, timeout=600)
            ckpt = work / f"{args.cost_dataset}-spa-{encoding}.safetensors"
            _ = load_checkpoint(ckpt, backbone)[0].codec
        for name in args.profiles:
            net = profile(name)
            with CloudClient(url, token, profile=net) as client:
                runs = [("base", None, None)] + [
                    (f"{e}/{mode}", e, mode) for e in args.encodings for mode in TAP_MODES
                ]
                for key, encoding, mode in runs:
                    if key in cells.get(name, {}):
                        continue
                    model = None
                    if encoding is not None:
                        ckpt = work / f"{args.cost_dataset}-spa-{encoding}.safetensors"
                        model = load_checkpoint(ckpt, backbone)[0].eval()
                    cells.setdefault(name, {})[key] = _measure(
                        client, model, prompts, decode, mode, RemoteGeneration
                    )
                    r = cells[name][key]
                    print(
                        f"{name} {key}: {r['bytes_per_token']:,.0f} B/token, "
                        f"{r['bytes_per_position']:,.0f} B/position, T_total "
                        f"{1e3 * r['t_total_per_token']:.1f} ms/token, first device token "
                        f"{r['first_device_token_s']}",
                        flush=True,
                    )
                    _save(results, {"cost": config}, args.out)
            for r in cells[name].values():
                r["vs_base"] = r["t_total_per_token"] / cells[name]["base"]["t_total_per_token"]
                first = cells[name]["base"]["first_token_s"]
                if r["first_device_token_s"] is not None:
                    r["first_device_vs_base_first"] = r["first_device_token_s"] / first
            _save(results, {"cost": config}, args.out)


def _measure(client, model, prompts, decode, mode, generation) -> dict:
    """Generate every prompt once; totals per token, first (device) token latency per prompt."""
    tokens = t_total = bytes_to_device = bytes_from_device = positions = 0.0
    firsts, device_firsts, contacts = [], [], 0
    for prompt in prompts:
        run = generation(
            client,
            model,
            prompt,
            "base" if model is None else "spa",
            decode,
            tap_mode=mode,
            deadline_s=DEADLINE_S,
        )
        first_device = None
        for i, token in enumerate(run):
            if i == 0:
                firsts.append(run.accounts.wall_s)
            if first_device is None and token.branch == "device":
                first_device = run.accounts.wall_s
        if first_device is not None:
            device_firsts.append(first_device)
        a = run.accounts
        tokens += a.tokens
        t_total += a.t_total
        bytes_to_device += a.bytes_to_device
        bytes_from_device += a.bytes_from_device
        positions += a.tap_positions
        contacts += a.contacts
    return {
        "tokens": tokens,
        "contacts": contacts,
        "M": contacts / max(tokens, 1),
        "bytes_per_token": (bytes_to_device + bytes_from_device) / max(tokens, 1),
        "bytes_per_position": bytes_to_device / positions if positions else 0.0,
        "t_total_per_token": t_total / max(tokens, 1),
        "first_token_s": sum(firsts) / len(firsts),
        "first_device_token_s": sum(device_firsts) / len(device_firsts) if device_firsts else None,
    }


def render(results: dict) -> str:
    """The results as Markdown (the docs' results page): quality per encoding, then cost."""
    quality = [
        [
            dataset,
            encoding,
            r["tap_bytes"] or "—",
            f"{r['bytes_per_token']:,.0f}",
            f"{r['rouge_l']:.2f} [{r['rouge_l_ci'][0]:.2f}, {r['rouge_l_ci'][1]:.2f}]",
            f"{r['usage']:.2f}",
        ]  # fmt: skip
        for dataset, cells in results.get("quality", {}).items()
        for encoding, r in cells.items()
    ]
    parts = [harness.table(["dataset", "encoding", "B / tap position",
                            "B / token (in-process books)", "Rouge-L [95 % CI]", "usage"],
                           quality)]  # fmt: skip
    cost = [
        [
            name,
            key,
            f"{r['bytes_per_position']:,.0f}",
            f"{r['bytes_per_token']:,.0f}",
            f"{r['M']:.2f}",
            f"{1e3 * r['t_total_per_token']:.1f}",
            f"{r.get('vs_base', 1):.2f}",
            _maybe(r["first_device_token_s"]),
            _maybe(r.get("first_device_vs_base_first")),
        ]  # fmt: skip
        for name, cells in results.get("cost", {}).items()
        for key, r in cells.items()
    ]
    if cost:
        headers = ["profile", "encoding / mode", "B / tap position (wire)", "B / token (wire)",
                   "M", "T_total ms / token", "÷ base", "first device token s",
                   "÷ base first token"]  # fmt: skip
        parts.append(harness.table(headers, cost))
    return "\n\n".join(parts)


def _maybe(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def main() -> None:
    parser = harness.parser(
        __doc__, work=".bench/wire", phases=("quality", "cost"), results=RESULTS
    )
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--encodings", nargs="+", default=list(TAP_ENCODINGS))
    parser.add_argument("--train-size", type=int, default=300)
    parser.add_argument("--valid-size", type=int, default=50)
    parser.add_argument("--test-size", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--target-usage", type=float, default=0.5)
    parser.add_argument("--max-prompt-tokens", type=int, default=384)
    parser.add_argument("--cache", default=None, help="feature cache root")
    parser.add_argument("--cost-dataset", default="personachat")
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES))
    parser.add_argument("--prompts", type=int, default=3, help="test prompts per cost cell")
    parser.add_argument("--tokens", type=int, default=24, help="tokens per cost generation")
    harness.run(parser, render, quality=quality, cost=cost)


if __name__ == "__main__":
    main()
