"""Dependencies flow one way: app → device_agent → personalization, cloud_api → personalization.

The privacy claim rests on this: the device talks to the cloud only over HTTP, so whatever it
reveals is in the bytes it sends. Every import in the source, including lazy ones, is checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "personalization": {"app", "device_agent", "cloud_api", "gradio", "flwr", "fastapi", "uvicorn"},
    "device_agent": {"app", "cloud_api", "gradio"},
    "cloud_api": {"app", "device_agent", "gradio", "flwr"},
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_flow_one_way(package: str):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package} has no modules"
    offenders = {str(f.relative_to(ROOT)): sorted(_imports(f) & FORBIDDEN[package]) for f in files}
    assert {f: bad for f, bad in offenders.items() if bad} == {}
