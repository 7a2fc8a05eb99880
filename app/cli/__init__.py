"""`spa`: the project's one command-line entry point (and `spa-demo`, `spa-cloud`, which run one of
its commands alone). One module per group of commands; this one assembles them and reports the
project's errors.

Heavy imports (torch, transformers, gradio, flwr) happen inside the commands, so `spa --help`
answers at once.
"""

from __future__ import annotations

from collections.abc import Callable

import click
import typer
from typer.core import TyperCommand, TyperGroup

from app.cli import device, experiment, model, recommend, serve
from personalization.errors import SpaError


class _ReportsErrors:
    """Every `SpaError` a command raises, whatever its depth, ends here: its message on one line
    of stderr and exit code 2, never a traceback. Anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SpaError as exc:
            message = " ".join(line.strip() for line in str(exc).splitlines())
            typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None


class _Group(_ReportsErrors, TyperGroup):
    pass


class _Command(_ReportsErrors, TyperCommand):
    pass


cli = typer.Typer(
    name="spa",
    cls=_Group,
    help="SPA (Side Plugin Adaption): a frozen cloud backbone + a private on-device side network.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for group in (model, experiment, recommend, serve):
    cli.add_typer(group.app)
cli.add_typer(device.app, name="device")


def main() -> None:
    cli()


def _alone(command: Callable[..., None]) -> None:
    """Run one command as a program of its own (its options, no subcommand name)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(cls=_Command)(command)
    app()


def demo_main() -> None:
    """The `spa-demo` script: `spa demo` with its options."""
    _alone(serve.demo)


def cloud_main() -> None:
    """The `spa-cloud` script: `spa cloud` with its options."""
    _alone(serve.cloud)
