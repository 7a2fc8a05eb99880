"""A few rounds of the crash harness (benchmarks/crash_harness.py): a device-store writer and
the cloud SIGKILLed mid-write, every store reopened and checked. The harness itself runs 100+."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


def test_killed_writers_leave_every_store_whole(tmp_path):
    out = tmp_path / "crash.json"
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/crash_harness.py",
            "--kills",
            "4",
            "--cloud-every",
            "4",
            "--seed",
            "1",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["kills"] == 4 and results["kills_by_op"].get("cloud") == 1
    assert results["writes_completed"] > 0 and results["sessions_finished"] > 0
    assert results["corrupted_or_lost"] == 0, results["problems"]
