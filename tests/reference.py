"""Test oracles: the slow, obviously-right computations the fast paths must reproduce."""

from __future__ import annotations

import torch
from torch import Tensor

from personalization.config import GATED_SETTINGS
from personalization.model import SPAModel


@torch.no_grad()
def sequence_logits(model: SPAModel, input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Logits [B, T, V] and σ [B, T] for every position in one full pass: what incremental
    decoding (KV caches, side caches, token trees) must reproduce position by position."""
    if model.adapted is not None:
        logits = model.adapted(input_ids, logits="all").logits
        return logits, torch.ones(logits.shape[:-1], dtype=torch.bool)
    if model.setting == "base":
        logits = model.backbone(input_ids, logits="all").logits
        return logits, torch.zeros(logits.shape[:-1], dtype=torch.bool)
    out = model.backbone(input_ids, rungs=model.rungs, logits=None)
    f = out.hidden
    p = model.gate_prob(f) if model.setting in GATED_SETTINGS else None
    sigma = model.sigma(p, f)
    g = model.wire(model.side(model.wire_taps(out.taps, model.side_dtype)), f.dtype)
    return model.combine(f, g, sigma), sigma
