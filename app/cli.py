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
        _fail(str(exc))


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
    prompt: Annotated[str, typer.Argument(help="What to ask.")],
    backbone: Backbone = None,
    setting: Annotated[
        str, typer.Option(help="base, lst, full, choice, spa, lora or adapter.")
    ] = "base",
    strategy: Annotated[str, typer.Option(help="greedy, sample or beam.")] = "greedy",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Stop after this many tokens.")] = 64,
    num_beams: Annotated[int, typer.Option(min=1, help="Beams (strategy beam).")] = 4,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    threshold: Annotated[float, typer.Option(help="Gate threshold (choice, spa).")] = 0.5,
    chat: Annotated[
        bool, typer.Option(help="Wrap the prompt in the backbone's chat template.")
    ] = True,
) -> None:
    """Stream a generation to the terminal, with the communication it cost.

    Without a trained side network every SPA setting but `lst` reproduces `base`.
    """
    from personalization.config import DecodeConfig, SPAConfig
    from personalization.decoding import generate as run
    from personalization.model import SPAModel

    if not prompt.strip():
        _fail("the prompt is empty")
    try:
        spa = SPAConfig(setting=setting, threshold=threshold)
        decode = DecodeConfig(strategy, max_new_tokens, temperature, top_p, seed, num_beams)
    except ValueError as exc:
        _fail(str(exc))
    try:
        model = SPAModel(_load(backbone), spa)
    except ValueError as exc:  # e.g. peft cannot place LoRA in this architecture
        _fail(f"cannot build setting {setting!r} on this backbone: {exc}")
    if setting != "base":
        typer.secho(model.parameter_report(), dim=True, err=True)
    start = time.perf_counter()
    generation = run(model, model.backbone.encode_prompt(prompt, chat=chat), decode)
    for token in generation:
        sys.stdout.write(token.text)
        sys.stdout.flush()
    elapsed, books = time.perf_counter() - start, generation.books
    typer.secho(
        f"\n[{books.tokens} tokens in {elapsed:.1f} s, {books.tokens / elapsed:.1f} tokens/s; "
        f"device tokens {books.device_tokens}, M={books.m:.2f}, "
        f"{books.bytes_to_device + books.bytes_from_device:,} bytes to/from the device]",
        dim=True,
        err=True,
    )


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@cli.command()
def demo(backbone: Backbone = None) -> None:
    """Run the demo on the embedded defaults (for now: stream one generation to the terminal)."""
    typer.echo(f"prompt: {DEMO_PROMPT}\n")
    generate(DEMO_PROMPT, backbone=backbone, max_new_tokens=80)


def main() -> None:
    cli()


def demo_main() -> None:
    """The `spa-demo` script: `spa demo` with its options."""
    typer.run(demo)
