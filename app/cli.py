"""`spa`: the project's one command-line entry point (and `spa-demo`, which the Docker image runs).

Heavy imports (torch, transformers) happen inside the commands, so `spa --help` answers at once.
"""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

cli = typer.Typer(
    name="spa",
    help="SPA (Side Plugin Adaption): a frozen cloud backbone + a private on-device side network.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Backbone = Annotated[
    str | None,
    typer.Option(
        "--backbone",
        "-b",
        help="'smollm2' (embedded default), 'tiny-llama'/'tiny-gpt2' (random, for tests), a local "
        "model directory or a Hugging Face hub id. Default: $SPA_BACKBONE, else smollm2.",
        show_default=False,
    ),
]

DEMO_PROMPT = (
    "In two sentences, why would a phone keep a small private model next to a big cloud model?"
)


def _load(spec: str | None):
    """Load a backbone, turning loading failures into a clean CLI error instead of a traceback."""
    from personalization.backbone import UnsupportedBackboneError, load_backbone
    from personalization.embedded import BackboneNotFoundError

    try:
        return load_backbone(spec)
    except (BackboneNotFoundError, UnsupportedBackboneError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


@cli.command()
def prepare(backbone: Backbone = None) -> None:
    """Convert and cache the backbone (first run ~20 s), then print its facts."""
    start = time.perf_counter()
    model = _load(backbone)
    typer.echo(
        f"backbone {model.name}: L={model.num_layers} layers, H={model.hidden_size}, "
        f"vocab={model.vocab_size}, {model.num_parameters / 1e6:.1f} M parameters, "
        f"chat template: {'yes' if model.chat_template else 'no'} "
        f"(ready in {time.perf_counter() - start:.1f} s)"
    )


@cli.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to ask the backbone.")],
    backbone: Backbone = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Stop after this many tokens.")] = 64,
    chat: Annotated[
        bool, typer.Option(help="Wrap the prompt in the backbone's chat template.")
    ] = True,
) -> None:
    """Stream a generation from the backbone alone (setting `base`) to the terminal."""
    from personalization.decoding import greedy

    if not prompt.strip():
        typer.secho("error: the prompt is empty", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    model = _load(backbone)
    start, count = time.perf_counter(), 0
    for token in greedy(model, model.encode_prompt(prompt, chat=chat), max_new_tokens):
        sys.stdout.write(token.text)
        sys.stdout.flush()
        count += 1
    elapsed = time.perf_counter() - start
    typer.secho(
        f"\n[{count} tokens in {elapsed:.1f} s, {count / elapsed:.1f} tokens/s]", dim=True, err=True
    )


@cli.command()
def demo(backbone: Backbone = None) -> None:
    """Run the demo on the embedded defaults (for now: stream one generation to the terminal)."""
    typer.echo(f"prompt: {DEMO_PROMPT}\n")
    generate(DEMO_PROMPT, backbone=backbone, max_new_tokens=80, chat=True)


def main() -> None:
    cli()


def demo_main() -> None:
    """The `spa-demo` script: `spa demo` with its options."""
    typer.run(demo)
