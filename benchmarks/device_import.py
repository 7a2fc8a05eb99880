"""What importing the device costs: RSS, seconds, and whether peft / transformers were loaded.

Each measurement is a fresh interpreter that runs `import device_agent.agent` and reads its own
VmRSS. `--against REV` measures a git revision of this repository side by side (its tree is
exported to a temporary directory and put first on PYTHONPATH), so a change's effect is one
command:

    python benchmarks/device_import.py --against d2abb5f --repeat 3

Writes benchmarks/results/device_import.json (figures, config, hardware, date).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import hardware

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, resource, sys, time
t = time.perf_counter()
import device_agent.agent
seconds = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (KiB on Linux)
print(json.dumps({"rss_mb": rss, "seconds": seconds, "peft": "peft" in sys.modules,
                  "transformers": "transformers" in sys.modules}))
"""


def measure(tree: Path, repeat: int) -> dict:
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", PROBE],
                env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                cwd=tempfile.gettempdir(),
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        for _ in range(repeat)
    ]
    return {
        "rss_mb": statistics.median(r["rss_mb"] for r in runs),
        "seconds": statistics.median(r["seconds"] for r in runs),
        "peft": runs[0]["peft"],
        "transformers": runs[0]["transformers"],
        "runs": runs,
    }


def export(rev: str, into: Path) -> Path:
    """The tree of `rev`, unpacked under `into`."""
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True)
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def main() -> None:
    parser = harness.parser(__doc__, data=False, backbone=False)
    parser.add_argument("--against", help="a git revision to measure beside the working tree")
    parser.add_argument("--repeat", type=int, default=3, help="interpreters per tree (median)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/device_import.json")
    args = parser.parse_args()

    trees = {"working tree": ROOT}
    with tempfile.TemporaryDirectory() as tmp:
        if args.against:
            trees = {args.against: export(args.against, Path(tmp))} | trees
        results = {name: measure(tree, args.repeat) for name, tree in trees.items()}

    print(f"import device_agent.agent — {hardware()}")
    print("| tree | RSS after import | import time | peft loaded | transformers loaded |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['rss_mb']:.0f} MB | {r['seconds']:.2f} s | {r['peft']} | "
            f"{r['transformers']} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "device_import",
                "config": {"against": args.against, "repeat": args.repeat},
                "hardware": hardware(),
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
