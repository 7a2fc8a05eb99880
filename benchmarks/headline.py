"""README's headline table: one row per claim users come for, each figure read from the results
file the named benchmark wrote (tests/test_docs.py fails when README's copy is stale).

    python benchmarks/headline.py            # print the table
    python benchmarks/headline.py --readme   # write it into README.md between its markers
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- begin: benchmarks/headline.py -->", "<!-- end: benchmarks/headline.py -->"


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def rows() -> list[tuple[str, str, str]]:
    """(claim, figure, results file) rows."""
    out = []
    ahead = _load("run_ahead")["cost"]
    for profile in ("fiber", "lte"):
        best = min(
            (m for m in ahead[profile] if m.startswith("spa")),
            key=lambda m: ahead[profile][m]["wait_vs_base"],
        )
        cell = ahead[profile][best]
        out.append(
            (
                f"SPA's wait per token ÷ the backbone alone, `{profile}` link",
                f"{cell['wait_vs_base']:.2f}× ({best}; {cell['bytes_per_token']:,.0f} B / token)",
                "run_ahead",
            )
        )
    cells = _load("cloud_concurrency")["cells"]["base"]
    out.append(
        (
            "Cloud tokens/s at 8 concurrent sessions ÷ 1 session",
            f"{cells['8']['speedup']:.2f}×",
            "cloud_concurrency",
        )
    )
    rec = _load("recommend")["summary"]
    best = f"{rec['best_baseline']} {rec['best_baseline_recall@10']:.4f}"
    out.append(
        (
            "Recommendation Recall@10 (Beauty, item codes) vs the best baseline",
            f"{rec['recall@10']:.4f} vs {best}",
            "recommend",
        )
    )
    out.append(
        (
            "Speculative beam search, strict (identical output), K = 10",
            f"{rec['strict_speedup@10']:.2f}× beam search",
            "recommend",
        )
    )
    crash = _load("crash_harness")
    out.append(
        (
            "Kills mid-write (checkpoints, logs, imports, the cloud)",
            f"{crash['kills']} kills, {crash['corrupted_or_lost']} records corrupted or lost",
            "crash_harness",
        )
    )
    return out


def render(link: str = "[{name}.json](benchmarks/results/{name}.json)") -> str:
    """The table; `link` formats each row's pointer to its results (the docs link pages)."""
    lines = ["| claim | measured | results |", "|---|---|---|"]
    for claim, figure, name in rows():
        lines.append(f"| {claim} | {figure} | {link.format(name=name)} |")
    return "\n".join(lines)


def block() -> str:
    return f"{BEGIN}\n{render()}\n{END}"


def write_readme() -> None:
    text = README.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    README.write_text(text[:start] + block() + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", action="store_true", help="write it into README.md")
    if parser.parse_args().readme:
        write_readme()
    else:
        print(render())


if __name__ == "__main__":
    main()
