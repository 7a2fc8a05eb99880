"""Peak memory and training throughput of a device that trains against a remote backbone.

    python benchmarks/device_training.py [--users 6] [--epochs 3] [--data ../shared/data]

Starts `spa cloud` (SmolLM2 by default) as its own process, then in *this* process — the device —
initialises a store, imports PersonaChat users' histories, and trains `spa` against the cloud:
features fetched over HTTP and cached, epochs on the frozen head, gate calibrated through cloud
sessions. The device never loads the backbone, so its peak RSS (printed, with the share spent
before training: Python, torch, transformers imports) is what a phone-sized process needs.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import hardware
from benchmarks.servers import free_port, spawn, stop, wait_ready
from device_agent.agent import DeviceAgent
from device_agent.history import user_items
from device_agent.trainer import DeviceTrainConfig, Progress
from personalization.training.data import read_jsonl
from personalization.training.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--users", type=int, default=6, help="PersonaChat users on this device")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    path = Path(args.data) / "personachat.jsonl"
    users = [str(r["user_id"]) for _, r in zip(range(args.users), read_jsonl(path), strict=False)]
    work = Path(tempfile.mkdtemp(prefix="spa-device-bench-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cloud = spawn(work, port, args.backbone)
    try:
        t = time.perf_counter()
        ready = wait_ready(cloud, url, timeout_s=600).json()
        print(f"cloud ({ready['backbone']}) ready in {time.perf_counter() - t:.1f} s on {url}")
        rss_start = peak_rss_mb()
        epochs: list[tuple[float, dict]] = []
        marks: dict[str, float] = {}
        rss: dict[str, float] = {}  # peak RSS when each stage reported

        def on_progress(p: Progress) -> None:
            rss[p.stage] = max(rss.get(p.stage, 0.0), peak_rss_mb())
            marks.setdefault(f"{p.stage}-start", time.perf_counter())
            marks[f"{p.stage}-end"] = time.perf_counter()
            if p.stage == "epoch":
                epochs.append((time.perf_counter(), p.info))

        with DeviceAgent.init(work / "device", url, "bench") as agent:
            for user in users:
                agent.store.add_items(user_items(path, user))
            cfg = DeviceTrainConfig(train=TrainConfig(epochs=args.epochs), calibration_prompts=4)
            start = time.perf_counter()
            run = agent.train(cfg, on_progress=on_progress, progress=True)
            wall = time.perf_counter() - start
            tokens = sum(len(f.labels) for f in _features(agent, run))
        features_mb = (
            sum(f.stat().st_size for f in (work / "device" / "features").rglob("*") if f.is_file())
            / 2**20
        )
        train_s = run.seconds["train"]
        print(f"\nhardware: {hardware()}")
        print(
            f"device: {len(users)} PersonaChat users, {run.examples} training examples "
            f"(+{run.valid_examples} held out), {tokens:,} target tokens, setting spa, "
            f"{args.epochs} epochs"
        )
        print(
            f"features fetched from the cloud: {run.feature_passes} examples, "
            f"{run.seconds['prepare']:.1f} s (incl. tokenize and head), "
            f"cached {features_mb:.1f} MB"
        )
        print(
            f"training: {train_s:.1f} s = {run.examples * args.epochs / train_s:.1f} examples/s, "
            f"{tokens * args.epochs / train_s:,.0f} target tokens/s"
        )
        print(
            f"calibration through the cloud: {run.seconds.get('calibrate', 0):.1f} s "
            f"({json.dumps(run.calibration)})"
        )
        print(f"total device wall time: {wall:.1f} s")
        print(
            f"device peak RSS: {peak_rss_mb():.0f} MB (of which {rss_start:.0f} MB before "
            "training: interpreter and imports); the backbone lives in the cloud process"
        )
        stages = ", ".join(f"{k} {v:.0f}" for k, v in rss.items())
        print(f"peak RSS by the end of each stage (MB): {stages}")
    finally:
        stop(cloud)


def _features(agent: DeviceAgent, run) -> list:
    """The run's training features, from the device's cache (for the token count)."""
    from device_agent.history import to_record
    from device_agent.trainer import RemoteFeatures, _split
    from personalization.training.features import FeatureCache

    cfg = DeviceTrainConfig.from_dict(run.config)
    examples = agent.client.tokenize(
        [to_record(i) for i in agent.store.items()],
        max_prompt_tokens=cfg.max_prompt_tokens,
        max_target_tokens=cfg.max_target_tokens,
        keep=cfg.keep,
    )
    train, _ = _split(examples, cfg.valid_fraction, cfg.train.seed)
    model = agent.model()
    cache = FeatureCache(
        RemoteFeatures(agent.client, model.rungs, cfg.wire_dtype), agent.store.root
    )
    return cache.lazy(train)


if __name__ == "__main__":
    main()
