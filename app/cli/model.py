"""`spa prepare`, `spa settings`, `spa generate`: the backbone and the SPA settings in-process."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from app.cli.options import SETTING, Backbone, Choice, Dtype, NoRepeatNgram, RepetitionPenalty
from app.cli.speculative import PREFIX, DraftBeams, DraftCheckpoint, DraftLayers, Gamma, load_draft
from personalization.config import SPECULATIVE_STRATEGIES, STRATEGIES
from personalization.errors import ConfigError

app = typer.Typer()


STRATEGY = Choice((*STRATEGIES, *SPECULATIVE_STRATEGIES), "strategy")


@app.command()
def prepare(backbone: Backbone = None) -> None:
    """Convert and cache the backbone (first run ~20 s), then print its facts."""
    from personalization.backbone.loading import load_backbone

    start = time.perf_counter()
    model = load_backbone(backbone)
    typer.echo(
        f"backbone {model.name}: L={model.num_layers} layers, H={model.hidden_size}, "
        f"vocab={model.vocab_size}, {model.num_parameters / 1e6:.1f} M parameters, "
        f"chat template: {'yes' if model.chat_template else 'no'} "
        f"(ready in {time.perf_counter() - start:.1f} s)"
    )


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to ask.")],
    backbone: Backbone = None,
    dtype: Dtype = "float32",
    setting: Annotated[str, typer.Option(click_type=SETTING, help="Who produces the tokens.")] = (
        "base"
    ),
    strategy: Annotated[
        str,
        typer.Option(
            click_type=STRATEGY,
            help="Decoding; speculative-* is beam search drafted by a small model.",
        ),
    ] = "greedy",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Stop after this many tokens.")] = 64,
    num_beams: Annotated[int, typer.Option(min=1, help="Beams (strategy beam).")] = 4,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    repetition_penalty: RepetitionPenalty = 1.0,
    no_repeat_ngram_size: NoRepeatNgram = 0,
    threshold: Annotated[float, typer.Option(help="Gate threshold (choice, spa).")] = 0.5,
    chat: Annotated[
        bool, typer.Option(help="Wrap the prompt in the backbone's chat template.")
    ] = True,
    draft: DraftCheckpoint = None,
    draft_layers: DraftLayers = None,
    gamma: Gamma = 3,
    draft_beams: DraftBeams = None,
) -> None:
    """Stream a generation to the terminal, with the communication it cost.

    Without a trained side network every SPA setting but `lst` reproduces `base`. The
    speculative strategies are beam search drafted by a small model (see `spa recommend`).
    """
    import torch

    from personalization.backbone.loading import load_backbone
    from personalization.config import DecodeConfig, SPAConfig
    from personalization.decoding import generate as run
    from personalization.model import SPAModel

    if not prompt.strip():
        raise ConfigError("the prompt is empty")
    speculative = strategy.startswith(PREFIX)
    spa = SPAConfig(setting=setting, threshold=threshold)
    decode = DecodeConfig(
        strategy="beam" if speculative else strategy,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        num_beams=num_beams,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )
    try:
        model = SPAModel(load_backbone(backbone, dtype=getattr(torch, dtype)), spa)
    except ValueError as exc:  # e.g. peft cannot place LoRA in this architecture
        raise ConfigError(f"cannot build setting {setting!r} on this backbone: {exc}") from exc
    if setting != "base":
        typer.secho(model.parameter_report(), dim=True, err=True)
    if speculative:
        from personalization.atspeed.speculative import SpeculativeConfig

        verify = strategy.removeprefix(PREFIX)
        spec = SpeculativeConfig(
            gamma=gamma, draft_beams=draft_beams, verify=verify, seed=seed or 0
        )
        drafter = load_draft(model.backbone, draft, draft_layers)
        _speculative_generate(model, drafter, prompt, chat, decode, spec)
        return
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


def _speculative_generate(model, drafter, prompt, chat, decode, spec) -> None:
    """Speculative beam search for `generate`: the best beam, then what the search did."""
    from personalization.atspeed.speculative import speculative_beam_search

    start = time.perf_counter()
    prompts = [model.backbone.encode_prompt(prompt, chat=chat)]
    result = speculative_beam_search(model, drafter, prompts, decode, spec)
    best, stats = result.hypotheses[0][0], result.stats
    typer.echo(model.backbone.decode(best.ids))
    elapsed = time.perf_counter() - start
    typer.secho(
        f"[{len(best.ids)} tokens in {elapsed:.1f} s; {stats.target_steps} beam steps in "
        f"{stats.target_passes} target passes, {stats.acceptance:.0%} of drafted steps "
        f"accepted; device contacts {stats.contacts}]",
        dim=True,
        err=True,
    )


@app.command()
def settings(backbone: Backbone = None) -> None:
    """Every setting side by side: trainable parameters and device contacts per token."""
    from personalization.backbone.loading import load_backbone
    from personalization.baselines import CONTACTS_PER_LAYER
    from personalization.config import SETTINGS, SPAConfig
    from personalization.model import SPAModel

    model = load_backbone(backbone)
    contacts = {"base": "0", "lst": "1", "full": "1", "choice": "σ", "spa": "σ"}
    contacts |= {k: str(v * model.num_layers) for k, v in CONTACTS_PER_LAYER.items()}
    typer.echo(f"backbone {model.name}: {model.num_parameters:,} parameters, L={model.num_layers}")
    typer.echo(f"{'setting':<8} {'trainable':>12} {'% backbone':>11} {'contacts/token':>15}")
    for setting in SETTINGS:
        n = SPAModel(model, SPAConfig(setting=setting)).trainable_parameters()
        share = 100 * n / model.num_parameters
        typer.echo(f"{setting:<8} {n:>12,} {share:>10.3f}% {contacts[setting]:>15}")
    typer.echo("σ: only where the gate asks (the calibrated usage; at most 1)")
