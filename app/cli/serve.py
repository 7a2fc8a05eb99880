"""`spa cloud`, `spa demo`, `spa federate`: the launchers of long-running processes.

`spa cloud`'s flags are generated from `CloudSettings`, so every server setting is a flag with its
default in `--help`, and a new setting needs no CLI change.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, get_args, get_origin

import typer
from click.core import ParameterSource
from pydantic import SecretStr
from pydantic.fields import FieldInfo

from app.cli.options import Backbone, Choice
from cloud_api.settings import CloudSettings
from personalization.config import FEDERATED_STRATEGIES
from personalization.errors import ConfigError, SpaError

app = typer.Typer()


@app.command()
def demo(
    backbone: Backbone = None,
    host: Annotated[
        str, typer.Option(help="Interface the UI listens on (0.0.0.0 in a container).")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=1, max=65535, envvar="SPA_DEMO_PORT", help="Port of the UI.")
    ] = 7860,
    cloud_url: Annotated[
        str | None,
        typer.Option(
            help="Use this (remote) cloud API instead of starting one.", show_default=False
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Devices, cloud records, federated runs. Default: $SPA_CACHE_DIR/demo.",
            show_default=False,
        ),
    ] = None,
    epochs: Annotated[
        int, typer.Option(min=1, help="Epochs the demo users are trained for on first start.")
    ] = 24,
    prepare_only: Annotated[
        bool, typer.Option(help="Train the demo users (if needed), then exit: a build step.")
    ] = False,
) -> None:
    """The Gradio demo: cloud API + demo users' devices + UI on http://HOST:PORT."""
    from app.demo import DemoSettings, serve
    from app.devices import DemoConfig, default_root

    settings = DemoSettings(
        backbone=backbone or os.environ.get("SPA_BACKBONE", "smollm2"),
        host=host,
        port=port,
        cloud_url=cloud_url,
        root=data_dir or default_root(),
        config=DemoConfig(epochs=epochs),
    )
    try:
        serve(settings, prepare_only=prepare_only)
    except (RuntimeError, OSError) as exc:  # the cloud it started died, a port is taken, ...
        raise SpaError(str(exc)) from exc


def cloud(ctx: typer.Context, **flags: Any) -> None:
    """Serve the frozen backbone as the SPA cloud API (FastAPI + uvicorn).

    Every flag can also be set as SPA_CLOUD_<FLAG> in the environment; flags win.
    """
    from pydantic import ValidationError
    from sqlalchemy.engine import make_url

    from cloud_api.server import serve

    given = {
        name: value
        for name, value in flags.items()
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    }
    try:
        settings = CloudSettings(**given)
    except ValidationError as exc:  # every invalid flag or variable at once
        errors = exc.errors()
        raise ConfigError(
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        ) from None
    records = make_url(settings.database_url).render_as_string(hide_password=True)
    scheme = "https" if settings.ssl_certfile else "http"
    typer.echo(
        f"spa cloud: backbone {settings.backbone or '(default)'} on "
        f"{scheme}://{settings.host}:{settings.port} (records: {records}; registration "
        f"{settings.registration_policy}; rate limit {settings.rate_limits or 'none'})"
    )
    if settings.registration_policy == "closed" and settings.operator_token is None:
        typer.secho(
            "registration is closed and no --operator-token is set: no new device can register",
            fg="yellow",
            err=True,
        )
    if not settings.loopback and settings.ssl_certfile is None:
        typer.secho(
            f"serving plain HTTP on {settings.host}: bearer tokens cross the network in the "
            "clear (give --ssl-certfile and --ssl-keyfile)",
            fg="yellow",
            err=True,
        )
    serve(settings)


def _flag(name: str, field: FieldInfo) -> inspect.Parameter:
    """The option of one `CloudSettings` field. Its value reaches the settings only when given on
    the command line, so the environment still beats the field's default; pydantic validates, so
    one run reports every bad value."""
    kind, metavar = field.annotation, None
    optional = type(None) in get_args(kind)
    if optional:  # X | None: the option takes an X
        kind = next(a for a in get_args(kind) if a is not type(None))
    if get_origin(kind) is Literal:
        kind, metavar = str, "[" + "|".join(get_args(kind)) + "]"
    if kind is SecretStr:
        kind = str
    if optional:
        kind = Optional[kind]  # noqa: UP045 (a runtime type for typer, not an annotation)
    env = CloudSettings.model_config["env_prefix"] + name.upper()
    text = f"{field.description or ''} (env {env})".strip()
    option = typer.Option(help=text, metavar=metavar)
    annotation = Backbone if name == "backbone" else Annotated[kind, option]
    default = field.get_default(call_default_factory=True)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


cloud.__signature__ = inspect.Signature(
    [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        *(_flag(name, field) for name, field in CloudSettings.model_fields.items()),
    ]
)
app.command()(cloud)


FEDERATED = Choice(FEDERATED_STRATEGIES, "strategy")


@app.command()
def federate(
    strategy: Annotated[
        str,
        typer.Option(
            click_type=FEDERATED,
            help="What the devices share: nothing, everything, or the side network's body.",
        ),
    ] = "fedavg",
    users: Annotated[int, typer.Option(min=1, help="Simulated devices (one user each).")] = 3,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 2,
    data: Annotated[
        Path, typer.Option(help="Users' histories: personachat.jsonl or beauty.jsonl.")
    ] = Path("../shared/data/personachat.jsonl"),
    work_dir: Annotated[
        Path, typer.Option(help="Device stores, federated.db, the summary table and plot.")
    ] = Path(".spa-federated"),
    backbone: Backbone = None,
    cloud_url: Annotated[
        str | None, typer.Option(help="Use this cloud instead of starting one.")
    ] = None,
    local_epochs: Annotated[int, typer.Option(min=1)] = 2,
    run_name: Annotated[str, typer.Option(help="Name of the run in the records.")] = "",
    catalogue: Annotated[
        Path | None,
        typer.Option(
            help="Beauty: the item titles the started cloud recommends among (its trained "
            "target, if any, is what the devices are compared with)."
        ),
    ] = None,
    deployment: Annotated[
        bool,
        typer.Option(
            "--deployment",
            help="Flower's deployment runtime: a SuperLink and one SuperNode per device, as "
            "separate processes (on 127.0.0.1), instead of the simulation engine.",
        ),
    ] = False,
) -> None:
    """A federated run: each device personalises against one cloud backbone."""
    from app.federation.launch import federate as run

    if not data.is_file():
        raise ConfigError(f"{data}: no such data file")
    code = run(
        strategy=strategy,
        nodes=users,
        rounds=rounds,
        data=data,
        work=work_dir,
        backbone=backbone or os.environ.get("SPA_BACKBONE", "smollm2"),
        cloud_url=cloud_url,
        extra={"local-epochs": local_epochs, "run-name": run_name},
        deployment=deployment,
        catalogue=catalogue,
    )
    raise typer.Exit(code)
