"""The docs pages written at build time (mkdocs-gen-files): every results page from
`benchmarks/results/*.json`, and the references generated from the code — the CLI from the typer
app, the cloud's settings from `CloudSettings`, the HTTP API from the OpenAPI schema. No figure
in the docs is typed by hand; a results file that is missing fails the build."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import click
import mkdocs_gen_files
import typer.core
import typer.main

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

#: results page → (the JSON it shows, the benchmark module that wrote it, a one-line title)
PAGES: dict[str, tuple[str, str, str]] = {
    "recommend": ("recommend.json", "recommend", "Next-item recommendation on item codes"),
    "run_ahead": ("run_ahead.json", "run_ahead", "Run-ahead: the user's wait per token"),
    "wire": ("wire.json", "wire", "Tap encodings and streamed taps"),
    "settings": ("settings", "results_table", "Every setting on the shared data"),
    "paper_tables": ("paper_tables.json", "paper_tables", "The paper's tables on SmolLM2"),
    "side_study": ("side_study.json", "side_study", "How the side network learns"),
    "federated": ("federated.json", "federated", "Federated learning with Flower"),
    "cloud_concurrency": ("cloud_concurrency.json", "cloud_concurrency", "Cloud concurrency"),
    "soak": ("soak.json", "soak", "Soak: many devices misbehaving for minutes"),
    "cloud_soak": ("cloud_soak.json", "cloud_concurrency", "Cloud soak at steady load"),
    "replicas": ("replicas.json", "replicas", "Replicas behind nginx, one killed mid-stream"),
    "crash_harness": ("crash_harness.json", "crash_harness", "Crash harness: kills mid-write"),
    "demo_users": ("demo_users.json", "demo_users", "The demo users' answers"),
    "device_import": ("device_import.json", "device_import", "Device start-up: import time"),
    "docker": ("docker.json", "docker_image", "The Docker image"),
}


#: pages whose file has another shape than what its module's `render` reads
GENERIC = {"cloud_soak"}


def commands(module) -> list[str]:
    """The commands the benchmark's docstring gives for running it."""
    return re.findall(r"^\s*(python benchmarks/\S+\.py[^\n]*)$", module.__doc__ or "", re.M)


def generic(results: dict) -> str:
    """A results file without a renderer of its own: its summary (or its top-level figures)."""
    shown = results.get("summary") or {
        k: v for k, v in results.items() if k not in ("hardware", "date", "config")
    }
    rows = ["| figure | value |", "|---|---|"]
    for key, value in shown.items():
        if isinstance(value, dict) and all(not isinstance(v, dict | list) for v in value.values()):
            rows += [f"| {key}.{k} | {_cell(v)} |" for k, v in value.items()]
        else:
            rows.append(f"| {key} | {_cell(value)} |")
    return "\n".join(rows)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict) and len(json.dumps(value)) > 120:
        return f"{type(value).__name__} of {len(value)}"
    return json.dumps(value, ensure_ascii=False) if isinstance(value, list | dict) else str(value)


def results_page(name: str, source: str, module_name: str, title: str) -> str:
    path = RESULTS / source
    if not path.exists():
        raise FileNotFoundError(f"results page {name!r} shows {path}, which does not exist")
    module = importlib.import_module(f"benchmarks.{module_name}")
    if path.is_dir():
        reports = [json.loads(p.read_text()) for p in sorted(path.glob("*.json"))]
        body, stamp = module.render(reports), reports[0] if reports else {}
    else:
        results = json.loads(path.read_text())
        render = getattr(module, "render", None) if name not in GENERIC else None
        body, stamp = (render or generic)(results), results
    run = "\n".join(commands(module)) or f"python benchmarks/{module_name}.py"
    lines = [
        f"# {title}",
        "",
        f"From `benchmarks/results/{source}`, written by `benchmarks/{module_name}.py`"
        f" on {stamp.get('hardware', 'unrecorded hardware')}"
        f" ({str(stamp.get('date', 'undated'))[:10]}). Reproduce with:",
        "",
        "```bash",
        run,
        "```",
        "",
        body,
    ]
    if isinstance(stamp, dict) and stamp.get("summary"):
        lines += ["", "## Summary", "", "```json", json.dumps(stamp["summary"], indent=1), "```"]
    return "\n".join(lines) + "\n"


def results_index() -> str:
    lines = [
        "# Results",
        "",
        "Every figure of these docs, rendered when the site is built from the JSON file the",
        "named benchmark wrote (`benchmarks/results/`). Rerun a benchmark and rebuild to update.",
        "",
        importlib.import_module("benchmarks.headline").render("[{name}]({name}.md)"),
        "",
        "| page | results file | written by |",
        "|---|---|---|",
    ]
    for name, (source, module, title) in PAGES.items():
        lines.append(f"| [{title}]({name}.md) | `{source}` | `benchmarks/{module}.py` |")
    return "\n".join(lines) + "\n"


def cli_reference() -> str:
    from app.cli import cli

    typer.core.HAS_RICH = False  # click's plain help text: the page shows it as it is
    root = typer.main.get_command(cli)
    lines = [
        "# Command line",
        "",
        "Generated from the `spa` typer app: each command's own `--help`.",
        "",
    ]

    def walk(command: click.Command, path: list[str], parent: click.Context | None) -> None:
        ctx = click.Context(command, info_name=path[-1], parent=parent, terminal_width=100)
        if len(path) > 1:
            lines.extend(
                [f"## `{' '.join(path)}`", "", "```text", command.get_help(ctx), "```", ""]
            )
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                walk(command.get_command(ctx, name), [*path, name], ctx)

    walk(root, ["spa"], None)
    return "\n".join(lines)


def settings_reference() -> str:
    from cloud_api.settings import CloudSettings
    from personalization.backbone.embedded import cache_dir

    prefix, cache = CloudSettings.model_config.get("env_prefix", ""), str(cache_dir())
    lines = [
        "# Cloud settings",
        "",
        "Generated from `cloud_api.settings.CloudSettings`: every setting of `spa cloud`, as a",
        f"flag (`--name-with-dashes`) or an environment variable (`{prefix}NAME`).",
        "",
        "| setting | environment | default | what |",
        "|---|---|---|---|",
    ]
    for name, field in CloudSettings.model_fields.items():
        default = repr(field.get_default(call_default_factory=True)).replace(cache, "<cache>")
        about = (field.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{name}` | `{prefix}{name.upper()}` | `{default}` | {about} |")
    return "\n".join(lines) + "\n"


def http_reference() -> str:
    from cloud_api.app import create_app
    from cloud_api.settings import CloudSettings

    spec = create_app(CloudSettings(database_url="sqlite://")).openapi()  # no file written
    lines = [
        "# HTTP API",
        "",
        "Generated from the cloud's OpenAPI schema (a running cloud serves it at `/openapi.json`",
        "and browsable at `/docs`); the story of a session is in [the protocol](../protocol.md).",
        "",
        "| method | path | what | request body |",
        "|---|---|---|---|",
    ]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            about = (op.get("summary") or op.get("description") or "").split("\n")[0]
            body = op.get("requestBody", {}).get("content", {})
            schema = next(iter(body.values()), {}).get("schema", {}).get("$ref", "")
            lines.append(
                f"| {method.upper()} | `{path}` | {about.replace('|', '/')} | "
                f"{schema.rsplit('/', 1)[-1] and '`' + schema.rsplit('/', 1)[-1] + '`'} |"
            )
    with mkdocs_gen_files.open("reference/openapi.json", "w") as f:
        json.dump(spec, f, indent=1)
    lines += ["", "The whole schema: [openapi.json](openapi.json)."]
    return "\n".join(lines) + "\n"


PYTHON_API = (
    "protocol.messages",
    "protocol.events",
    "personalization.config",
    "personalization.model",
    "personalization.side",
    "personalization.atspeed.codes",
    "personalization.atspeed.code_target",
    "device_agent.agent",
    "device_agent.generation",
    "device_agent.openai_server",
    "cloud_api.settings",
)


def python_reference() -> str:
    lines = ["# Python API", "", "Generated by mkdocstrings from the docstrings.", ""]
    for module in PYTHON_API:
        lines += [f"::: {module}", ""]
    return "\n".join(lines)


def main() -> None:
    pages = {f"results/{name}.md": (results_page, (name, *spec)) for name, spec in PAGES.items()}
    pages |= {
        "results/index.md": (results_index, ()),
        "reference/cli.md": (cli_reference, ()),
        "reference/settings.md": (settings_reference, ()),
        "reference/http-api.md": (http_reference, ()),
        "reference/python.md": (python_reference, ()),
    }
    for page, (make, args) in pages.items():
        with mkdocs_gen_files.open(page, "w") as f:
            f.write(make(*args))


if __name__ == "<run_path>":  # how mkdocs-gen-files runs this file (runpy.run_path)
    main()
