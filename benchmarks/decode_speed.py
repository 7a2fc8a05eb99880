"""Decoding speed: plain `model.generate` vs our incremental decoder, side by side, one run.

    python benchmarks/decode_speed.py [--backbone smollm2] [--tokens 64] [--repeats 3]

Prints tokens/s for transformers' greedy `generate`, our decoder in `base`, and in `spa` with the
gate forced open (threshold 0: the side network runs for every token, catch-up included), plus the
ratios to plain generate. Each figure is the median of the repeats, measured in this one process.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks import harness
from benchmarks.harness import hardware
from personalization.backbone.loading import load_backbone
from personalization.config import DecodeConfig, SPAConfig
from personalization.decoding import generate
from personalization.model import SPAModel

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def main() -> None:
    parser = harness.parser(__doc__, data=False)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    backbone = load_backbone(args.backbone)
    prompt = backbone.encode_prompt(PROMPT)
    ids = torch.tensor([prompt])
    n = args.tokens

    def plain() -> int:
        with torch.inference_mode():
            out = backbone.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
            )
        return out.shape[1] - len(prompt)

    models = {
        "base": SPAModel(backbone, SPAConfig(setting="base")),
        "spa (gate always on)": SPAModel(backbone, SPAConfig(setting="spa", threshold=0.0)),
    }
    eos = backbone.eos_token_ids

    def ours(model: SPAModel):
        def run() -> int:
            return sum(1 for _ in generate(model, prompt, DecodeConfig(max_new_tokens=n)))

        return run

    runs = {"transformers generate": plain} | {name: ours(m) for name, m in models.items()}
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    counts: dict[str, int] = {}
    for _ in range(args.repeats):  # interleaved, so drift affects every contender alike
        for name, run in runs.items():
            start = time.perf_counter()
            counts[name] = run()
            speeds[name].append(counts[name] / (time.perf_counter() - start))

    print(f"hardware: {hardware()}")
    print(
        f"backbone: {backbone.name} (L={backbone.num_layers}, H={backbone.hidden_size}); "
        f"{models['spa (gate always on)'].parameter_report()}"
    )
    print(f"prompt: {len(prompt)} tokens; median of {args.repeats} runs; EOS ids {sorted(eos)}\n")
    reference = statistics.median(speeds["transformers generate"])
    print(f"{'decoder':<24}{'tokens':>8}{'tokens/s':>10}{'× generate':>12}")
    for name, values in speeds.items():
        median = statistics.median(values)
        print(f"{name:<24}{counts[name]:>8}{median:>10.1f}{median / reference:>12.2f}")


if __name__ == "__main__":
    main()
