"""One line describing the machine a benchmark ran on (printed with every result), and the
one way a benchmark writes its results file (stamped with that line and the date)."""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
from tabulate import tabulate


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def write_results(results: dict, path: Path) -> None:
    """Stamp `results` with the hardware and the date, and write them to `path` as JSON."""
    results |= {"hardware": hardware(), "date": datetime.now(UTC).isoformat(timespec="seconds")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def parser(
    doc: str,
    *,
    phases: tuple[str, ...] = (),
    data: bool = True,
    backbone: bool = True,
    results: Path | None = None,
    work: str | None = None,
) -> argparse.ArgumentParser:
    """A benchmark's command line: its docstring's first paragraph as the description, its
    `phases` (the first the default) plus `table`, and the options benchmarks share — `--data`
    (the shared data folder), `--backbone`, `--out` (the results file it writes), `--work` (its
    intermediate files, under the repository)."""
    p = argparse.ArgumentParser(
        description=doc.strip().split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    if phases:
        p.add_argument("phase", nargs="?", default=phases[0], choices=(*phases, "table"))
    if data:
        p.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    if backbone:
        p.add_argument("--backbone", default="smollm2", help="the frozen backbone")
    if results is not None:
        p.add_argument("--out", type=Path, default=results, help="the results file")
    if work is not None:
        p.add_argument("--work", default=str(ROOT / work), help="intermediate files")
    return p


def show(render: Callable[[dict], str], path: Path) -> None:
    """Print a results file as the tables of its docs page, after the machine and date."""
    results = json.loads(Path(path).read_text())
    print(f"{results.get('hardware', 'unrecorded hardware')}; {results.get('date', 'undated')}\n")
    print(render(results))


def run(parser: argparse.ArgumentParser, render: Callable[[dict], str], **phases) -> None:
    """Parse the command line and run its phase; `table` prints the results file's tables."""
    args = parser.parse_args()
    if args.phase == "table":
        show(render, args.out)
    else:
        phases[args.phase.replace("-", "_")](args)


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (cells already formatted as the page shows them)."""
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def splits(backbone, folder: Path, dataset: str, *, train: int, valid: int, test: int, tokens: int):
    """A shared dataset's seeded train/validation/test splits, as `spa train` / `spa eval`
    make them (prompts cut to `tokens`)."""
    from personalization.training.experiment import DataConfig, prepare_data

    path = str(Path(folder) / f"{dataset}.jsonl")
    config = DataConfig(
        path=path, train_size=train, valid_size=valid, test_size=test, max_prompt_tokens=tokens
    )
    return prepare_data(backbone, config)


def splits_of(backbone, args: argparse.Namespace, dataset: str):
    """`splits` with the sizes of a benchmark's own options (--train-size, --valid-size,
    --test-size, --max-prompt-tokens)."""
    return splits(
        backbone, args.data, dataset, train=args.train_size, valid=args.valid_size,
        test=args.test_size, tokens=args.max_prompt_tokens,
    )  # fmt: skip
