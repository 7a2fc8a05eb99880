"""A device's purchases as item codes: what it trains on for recommendation.

The cloud publishes its catalogue's codes (`GET /v1/codes`: public, built from the titles alone),
with the instruction every history prompt starts with and the identity of the backbone that reads
codes. From those the device builds its training examples itself — the same ids the cloud's own
code target trains on (`personalization.atspeed.prompts`) — and asks the cloud only for features
and the head over codes, by the codes' fingerprint. Its purchases never leave it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from device_agent.client import CloudClient
from device_agent.errors import DeviceError
from personalization.atspeed.codes import CodeConfig, ItemCodes
from personalization.atspeed.prompts import CodePrompts
from personalization.backbone.head import BackboneFacts
from protocol.messages import CodesOut

#: what a device trains on codes: the side network always asked (no gate to calibrate by
#: generating text), as the cloud's own code target
CODE_SETTINGS = ("lst", "full")


@dataclass(frozen=True)
class CodeBook:
    """The cloud's item codes as the device uses them."""

    published: CodesOut
    prompts: CodePrompts

    @classmethod
    def fetch(cls, client: CloudClient) -> CodeBook:
        out = client.codes()
        codes = ItemCodes(
            tuple(out.titles),
            np.asarray(out.codes, dtype=np.int64),
            CodeConfig(levels=out.levels, codebook=out.codebook),
            out.stats,
        )
        if codes.fingerprint != out.fingerprint:
            raise DeviceError("the cloud's item codes do not match their fingerprint")
        return cls(out, CodePrompts(codes, out.vocab_size, out.instruction))

    @property
    def fingerprint(self) -> str:
        return self.published.fingerprint

    def facts(self, text: BackboneFacts) -> BackboneFacts:
        """The backbone reading codes: the text backbone's facts, its vocabulary grown by one
        token per code, its identity that of the code rows too."""
        return replace(
            text,
            name=f"{text.name}+codes",
            fingerprint=self.published.backbone_fingerprint,
            vocab_size=self.published.vocab_size + self.prompts.codes.num_tokens,
        )

    def examples(self, titles: Sequence[str], valid_fraction: float) -> tuple[list, list]:
        """One training example (every next-item position of the earlier purchases in one pass,
        the last ≤ 21 of them, as the cloud's target trains) and one validation example (the
        last `valid_fraction` of them, ≥ 1, after the rest), from the purchases the catalogue
        knows, oldest first."""
        known = [t for t in titles if t in self.prompts.index]
        if len(known) < 2:
            raise DeviceError(
                f"{len(known)} of the device's purchases are in the cloud's catalogue: "
                "training on codes needs at least two"
            )
        held = max(1, round(valid_fraction * len(known))) if len(known) >= 3 else 0
        earlier = self.prompts.history_example(known[: len(known) - held])  # the last ≤ 21
        train = [] if earlier is None else [earlier]
        valid = [self.prompts.sequence_example(known, held)] if held else []
        return (train or valid), (valid if train else [])
