"""Options several commands share, and `Choice`: a typer choice over one of the project's own
vocabularies, so `--help` lists the names and a wrong one is refused before any work starts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

import click
import typer

from personalization.config import SETTINGS, TAP_ENCODINGS
from personalization.latency import PROFILES


class Choice(click.Choice):
    """One of `names` (a vocabulary of personalization.config), refused in the words the
    project's configs use (exit 2, like any usage error)."""

    def __init__(
        self,
        names: Iterable[str],
        what: str,
        refusal: str = "unknown {what} {value!r}; choose one of {choices}",
    ):
        super().__init__(tuple(names), case_sensitive=True)
        self.what, self.refusal = what, refusal

    def get_invalid_choice_message(self, value: object, ctx: click.Context | None) -> str:
        return self.refusal.format(what=self.what, value=value, choices=", ".join(self.choices))


SETTING = Choice(SETTINGS, "setting")
PROFILE = Choice(PROFILES, "network profile")
TapEncodingOption = Annotated[
    str,
    typer.Option(
        click_type=Choice(TAP_ENCODINGS, "tap encoding"),
        help="How taps cross the wire (training sees them exactly so): raw fp16, int8, or int8 "
        "coefficients on the backbone's public low-rank basis.",
    ),
]

RepetitionPenalty = Annotated[
    float,
    typer.Option(
        min=0.01, help="> 1 discourages tokens already in the prompt or output (transformers')."
    ),
]
NoRepeatNgram = Annotated[
    int, typer.Option(min=0, help="> 0: no n-gram of this many tokens occurs twice.")
]

Dtype = Annotated[
    str,
    typer.Option(
        click_type=Choice(("float32", "bfloat16", "float16"), "dtype"),
        help="Precision the backbone computes in (bfloat16 halves its memory; on CPU it is "
        "usually no faster).",
    ),
]

Backbone = Annotated[
    str | None,
    typer.Option(
        "--backbone",
        "-b",
        help="'smollm2' (embedded default), 'tiny-llama'/'tiny-qwen2'/'tiny-gpt2' (random, for "
        "tests), a local model directory or a Hugging Face hub id. Default: $SPA_BACKBONE, "
        "else smollm2.",
        show_default=False,
    ),
]
