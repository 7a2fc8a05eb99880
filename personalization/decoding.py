"""Token-by-token decoding over the backbone interface, as a streaming iterator."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from personalization.backbone import Backbone


@dataclass(frozen=True)
class Token:
    """One generated token, as a device, the UI and the accounting see it."""

    id: int
    text: str  # the text this token adds to the output (may be "" mid-way through a character)
    branch: str = "cloud"  # "cloud", "device" or "fallback"
    gate_prob: float | None = None


class Detokenizer:
    """Turns a growing list of ids into text pieces, holding back incomplete UTF-8 characters."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece


def greedy(
    backbone: Backbone, prompt_ids: Sequence[int], max_new_tokens: int = 64
) -> Iterator[Token]:
    """Greedy decoding with the backbone alone, one KV-cached step per token; stops at EOS."""
    detok = Detokenizer(backbone.tokenizer)
    cache = backbone.new_cache()
    inputs = torch.tensor([list(prompt_ids)])
    for _ in range(max_new_tokens):
        out = backbone(inputs, cache=cache, logits="last")
        token_id = int(out.logits[0, -1].argmax())
        yield Token(token_id, detok.push(token_id))
        if token_id in backbone.eos_token_ids:
            return
        inputs = torch.tensor([[token_id]])
