"""What every Flower process this project starts shares: the project (the Flower app), a safe
environment (no runtime dependency re-install, no telemetry or update checks, a run-local
FLWR_HOME, the venv's scripts on PATH), and run config as `flwr run --run-config` takes it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]  # where pyproject.toml's [tool.flwr.app] lives


def flower_env(work: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # flwr starts `flower-superlink` from PATH
    return os.environ | {
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
        "FLWR_HOME": str(work / "flwr-home"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "TOKENIZERS_PARALLELISM": "false",
    }


def run_config(values: dict[str, object]) -> str:
    """TOML key=value pairs for `flwr run --run-config`."""

    def toml(v: object) -> str:
        return (
            f'"{v}"'
            if isinstance(v, str | Path)
            else str(v).lower()
            if isinstance(v, bool)
            else str(v)
        )

    return " ".join(f"{k}={toml(v)}" for k, v in values.items())
