"""Aligning the draft with the target (AtSpeed's knowledge distillation).

Teacher data is the target's own top-K beam search for training prompts, plus the target's step
distributions along those items. The draft learns with loss (1 − α)·CE + α·align:

- CE: the real next item's tokens (the ground truth, as in fine-tuning);
- AtSpeed-S (for strict verification): reverse KL over the draft's top-k tokens plus a density
  regulariser weighted by the teacher's probability of the draft's k-th token — it raises the
  overlap of the two top-k sets, which is what strict top-K verification needs;
- AtSpeed-R (for relaxed verification): total variation distance ½·Σ|p − q|, since the
  acceptance probability of a drafted step is 1 − TVD on average.

Everything is measured under the catalogue: distributions are renormalised over the tokens a trie
node allows, and only *branching* nodes carry a signal (a forced token has p = q = 1).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from personalization.atspeed.catalogue import ROOT, Catalogue
from personalization.atspeed.draft import Draft
from personalization.atspeed.speculative import (
    SpeculativeConfig,
    TargetTree,
    speculative_beam_search,
)
from personalization.atspeed.tree import Path, TreeLayout, additive
from personalization.config import DecodeConfig
from personalization.errors import ConfigError
from personalization.model import SPAModel

Method = Literal["atspeed-s", "atspeed-r"]


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    method: Method = "atspeed-s"
    alpha: float = 0.7  # weight of the alignment term (AtSpeed: 0.7)
    top_k: int = 5  # k of AtSpeed-S's top-k reverse KL (the beam width K it serves)
    beta: float = 0.1  # weight of AtSpeed-S's density regulariser
    epochs: int = 3
    lr: float = 3e-4
    seed: int = 0

    def __post_init__(self):
        if self.method not in ("atspeed-s", "atspeed-r"):
            raise ConfigError(f"unknown alignment {self.method!r}: atspeed-s or atspeed-r")
        if not 0 <= self.alpha <= 1:
            raise ConfigError("alpha must lie in [0, 1]")


@dataclass(frozen=True)
class TeacherExample:
    """One training prompt: the target's distributions at the branching prefixes of its own
    top-K items and of the real next item."""

    prompt: tuple[int, ...]
    truth: tuple[int, ...] | None  # the real next item (EOS included), if in the catalogue
    items: tuple[tuple[int, ...], ...]  # the target's beam search output
    prefixes: tuple[Path, ...]  # branching prefixes (a node allowing ≥ 2 tokens)
    teacher: tuple[Tensor, ...]  # per prefix: log-probs over `catalogue.allowed(node)`


@torch.no_grad()  # the teacher's distributions are targets, not part of the draft's graph
def teacher_data(
    target: SPAModel,
    prompts: Sequence[Sequence[int]],
    truths: Sequence[Sequence[int] | None],
    catalogue: Catalogue,
    beams: int,
    draft: Draft | None = None,
    batch: int = 8,
) -> list[TeacherExample]:
    """The target's own beam search (`beams` items per prompt) and its step distributions at
    every branching prefix of those items. The search runs batched on the token tree, drafted by
    `draft` if given: strict speculative search, whose output is the target's own."""
    decode = DecodeConfig(
        strategy="beam", max_new_tokens=catalogue.max_length, num_beams=beams, length_penalty=0.0
    )
    spec = SpeculativeConfig(gamma=5 if draft is not None else 0, draft_beams=beams)
    out: list[TeacherExample] = []
    for start in range(0, len(prompts), batch):
        chunk = [list(p) for p in prompts[start : start + batch]]
        found = speculative_beam_search(target, draft, chunk, decode, spec, catalogue).hypotheses
        for prompt, truth, hyps in zip(chunk, truths[start : start + batch], found, strict=True):
            if truth is not None and catalogue.title(_walk(catalogue, truth)) is None:
                truth = None  # not a catalogue item: no ground truth to learn from
            out.append(_example(target, prompt, truth, [h.ids for h in hyps], catalogue))
    return out


def _example(
    target: SPAModel,
    prompt: list[int],
    truth: Sequence[int] | None,
    items: list[tuple[int, ...]],
    catalogue: Catalogue,
) -> TeacherExample:
    sequences = items + ([tuple(truth)] if truth is not None else [])
    prefixes = _branching(sequences, catalogue)
    tree = TargetTree(target, [prompt], catalogue)
    nodes = tree.missing(0, [p for p in prefixes if p])
    known = {(): tree.roots[0]}
    if nodes:
        known |= tree.extend([nodes])[0]
    trie = [catalogue.walk(p) for p in prefixes]
    logprobs = tree.logprobs(torch.stack([known[p] for p in prefixes]), trie)
    teacher = tuple(row[catalogue.allowed(n)] for row, n in zip(logprobs, trie, strict=True))
    return TeacherExample(
        tuple(prompt), None if truth is None else tuple(truth), tuple(items), prefixes, teacher
    )


def _walk(catalogue: Catalogue, ids: Sequence[int]) -> int:
    """The node `ids` lead to, or −1 where they leave the catalogue."""
    try:
        return catalogue.walk(ids)
    except KeyError:
        return -1


def _branching(sequences: Sequence[Sequence[int]], catalogue: Catalogue) -> tuple[Path, ...]:
    """Every proper prefix of the sequences whose trie node allows more than one token."""
    found: dict[Path, None] = {}
    for seq in sequences:
        node = ROOT
        for k, token in enumerate(seq):
            if len(catalogue.allowed(node)) > 1:
                found[tuple(seq[:k])] = None
            node = catalogue.child(node, token)
    return tuple(found)


# ---- losses -------------------------------------------------------------------------------------
def atspeed_s(logq: Tensor, logp: Tensor, k: int, beta: float) -> Tensor:
    """Top-k reverse KL Σ_{top-k of q} q·(log q − log p), plus β·p(k-th)·H_top-k(q), per row;
    rows are distributions over a shared column set, −inf where a row allows nothing."""
    k = min(k, logq.shape[-1])
    top_q, index = torch.topk(logq, k, dim=-1)
    top_p = logp.gather(-1, index)
    valid = torch.isfinite(top_q)  # a row allowing fewer than k tokens
    top_q, top_p = torch.where(valid, top_q, 0.0), torch.where(valid, top_p, 0.0)  # no NaN grads
    q = torch.where(valid, top_q.exp(), 0.0)
    rkl = (q * (top_q - top_p)).sum(-1)
    entropy = (-q * top_q).sum(-1)
    kth = (valid.sum(-1) - 1).clamp(min=0)
    p_kth = top_p.gather(-1, kth[:, None])[:, 0].exp()
    return rkl + beta * p_kth * entropy


def atspeed_r(logq: Tensor, logp: Tensor) -> Tensor:
    """Total variation distance ½·Σ|p − q| per row."""
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


# ---- training -----------------------------------------------------------------------------------
def draft_logprobs(
    draft: Draft, example: TeacherExample, catalogue: Catalogue
) -> tuple[Tensor, Tensor]:
    """The draft's columns [U] and log-probabilities [n, U] at the example's prefixes, from one
    differentiable pass over prompt + the prefixes' token tree."""
    prompt, prefixes = list(example.prompt), example.prefixes
    P = len(prompt)
    layout = TreeLayout([P])
    nodes = layout.missing(0, [p for p in prefixes if p])
    ids0, pos0, mask0 = layout.prefill([prompt])
    ids1, pos1, mask1 = layout.grow([nodes])
    T = len(nodes)
    mask = torch.zeros(1, 1, P + T, P + T, dtype=torch.bool)
    mask[..., :P, :P] = mask0
    mask[..., P:, :] = mask1
    normed = draft.net.decoder(
        input_ids=torch.cat([ids0, ids1], 1),
        attention_mask=additive(mask, draft.net.dtype),
        position_ids=torch.cat([pos0, pos1], 1),
        use_cache=False,
    ).last_hidden_state[0]  # after the final norm
    where = {p: P + i for i, p in enumerate(nodes)} | {(): P - 1}
    rows = normed[[where[p] for p in prefixes]]
    return draft.allowed_logprobs(rows, [catalogue.walk(p) for p in prefixes], catalogue)


def example_loss(
    draft: Draft, example: TeacherExample, catalogue: Catalogue, cfg: DistillConfig
) -> Tensor:
    """(1 − α)·CE on the real next item + α·alignment to the teacher, at branching prefixes."""
    cols, logq = draft_logprobs(draft, example, catalogue)
    column = {t: i for i, t in enumerate(cols.tolist())}
    logp = torch.full_like(logq, float("-inf"))
    for i, (prefix, teacher) in enumerate(zip(example.prefixes, example.teacher, strict=True)):
        allowed = catalogue.allowed(catalogue.walk(prefix))
        logp[i, [column[t] for t in allowed]] = teacher
    if cfg.method == "atspeed-s":
        align = atspeed_s(logq, logp, cfg.top_k, cfg.beta).mean()
    else:
        align = atspeed_r(logq, logp).mean()
    ce = torch.zeros(())
    if example.truth is not None:
        row = {p: i for i, p in enumerate(example.prefixes)}
        picks = [
            (row[tuple(example.truth[:k])], column[t])
            for k, t in enumerate(example.truth)
            if tuple(example.truth[:k]) in row
        ]
        if picks:
            r, c = zip(*picks, strict=True)
            ce = -logq[list(r), list(c)].mean()
    return (1 - cfg.alpha) * ce + cfg.alpha * align


@dataclass
class DistillReport:
    epochs: list[float]  # mean training loss per epoch
    seconds: float


def distill(
    draft: Draft, examples: Sequence[TeacherExample], catalogue: Catalogue, cfg: DistillConfig
) -> DistillReport:
    """Train the draft's own layers on the teacher data (AdamW, one example per step)."""
    start = time.perf_counter()
    params = list(draft.trainable().values())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    order = list(range(len(examples)))
    shuffle = random.Random(cfg.seed)
    losses = []
    try:
        for _ in range(cfg.epochs):
            shuffle.shuffle(order)
            total = 0.0
            for i in order:
                loss = example_loss(draft, examples[i], catalogue, cfg)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
            losses.append(total / max(1, len(order)))
    finally:
        for p in params:
            p.requires_grad_(False)
    return DistillReport(losses, time.perf_counter() - start)
