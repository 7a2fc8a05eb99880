"""The layout holds: dependencies flow one way, the protocol has one home, no import cycles.

    app → device_agent → protocol → personalization
          cloud_api   ─┘

The privacy claim rests on this: the device talks to the cloud only over HTTP, so whatever it
reveals is in the bytes it sends; both sides speak through `protocol`, which knows neither. Every
import in the source, including lazy ones, is checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "cloud_api", "device_agent", "personalization", "protocol")
FORBIDDEN = {
    "personalization": {"app", "device_agent", "cloud_api", "protocol"}
    | {"gradio", "flwr", "fastapi", "uvicorn"},
    "protocol": {"app", "device_agent", "cloud_api", "gradio", "flwr", "fastapi", "uvicorn"},
    "device_agent": {"app", "cloud_api", "gradio"},
    "cloud_api": {"app", "device_agent", "gradio", "flwr"},
}
#: the two sides of the wire: they build and read events only through protocol.events
SIDES = ("cloud_api", "device_agent")


def _modules() -> dict[str, Path]:
    """Every module of the project by dotted name (a package by its __init__)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imports(path: Path) -> set[str]:
    """Dotted names this file imports, anywhere in it (`from a import b` gives a.b if that is a
    module of ours, else a)."""
    names: set[str] = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                names.add(sub if sub in MODULES else node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_flow_one_way(package: str):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package} has no modules"
    offenders = {
        str(f.relative_to(ROOT)): sorted(
            {n.split(".")[0] for n in _imports(f)} & FORBIDDEN[package]
        )
        for f in files
    }
    assert {f: bad for f, bad in offenders.items() if bad} == {}


def _event_dicts(path: Path) -> list[str]:
    """Places that build an event as a dict literal or read one by its "event" key."""
    found, where = [], path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    for node in ast.walk(_tree(path)):
        keys = node.keys if isinstance(node, ast.Dict) else []
        if any(isinstance(k, ast.Constant) and k.value == "event" for k in keys):
            found.append(f"{where}:{node.lineno} builds an event dict")
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.slice, ast.Constant)
            and node.slice.value == "event"
        ):
            found.append(f"{where}:{node.lineno} reads an event dict")
    return found


@pytest.mark.parametrize("side", SIDES)
def test_neither_side_builds_or_reads_events_as_dicts(side: str):
    files = sorted((ROOT / side).rglob("*.py"))
    assert [place for f in files for place in _event_dicts(f)] == []


def test_the_event_check_finds_a_dict_event(tmp_path):
    """The check above can fail: it sees both kinds of dict event."""
    sample = tmp_path / "sample.py"
    sample.write_text('e = {"event": "token"}\nkind = e["event"]\n')
    assert len(_event_dicts(sample)) == 2


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles_anywhere_in_the_project():
    graph = {name: _imports(path) & MODULES.keys() for name, path in MODULES.items()}
    assert _cycle(graph) is None, " → ".join(_cycle(graph) or [])


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
