"""Print the README's results table from the JSON reports `benchmarks/results.sh` wrote.

python benchmarks/results_table.py [benchmarks/results/settings]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.harness import hardware
from personalization.training.evaluate import bootstrap_interval

ORDER = ("base", "lst", "full", "choice", "spa", "lora", "adapter")


def render(reports: list[dict]) -> str:
    """Every report as one Markdown table (the docs' results page)."""
    lines: list[str] = []
    out = lines.append
    out(
        "| dataset | setting | Rouge-L [95 % CI] | usage (threshold) | M | bytes / token | "
        "trainable % | cloud ms / token | T_total ms / token |"
    )
    out("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(reports, key=lambda r: (r["dataset"], ORDER.index(r["setting"]), r["usage"])):
        gate = "" if r.get("threshold") is None else f" ({r['threshold']:.3f})"
        low, high = bootstrap_interval(r["scores"])
        out(
            f"| {r['dataset']} | {r['setting']} | {r['rouge_l']:.2f} [{low:.2f}, {high:.2f}] | "
            f"{r['usage']:.2f}{gate} | {r['m']:.2f} | {r['bytes_per_token']:,.0f} | "
            f"{r['trainable_pct']:.3f} | {r['t_cloud_ms']:.1f} | {r['t_total_ms']:.1f} "
            f"({r['profile']}) |"
        )
    return "\n".join(lines)


def main(folder: str = "benchmarks/results/settings") -> None:
    reports = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]
    if not reports:
        sys.exit(f"no JSON reports in {folder}")
    print(f"hardware: {hardware()}\n")
    print(render(reports))


if __name__ == "__main__":
    main(*sys.argv[1:])
