"""Beam search as explicit per-step state, shared by the target's own search and speculative search.

`BeamSearch` is one prompt's search: `decoding`'s algorithm (transformers' top-2·K candidates, only
the first K may finish, the length-penalised early-stopping heuristic, float32 score sums), with
two generalisations: an optional `Catalogue` constraint, and fewer than K live beams when the
constraint leaves fewer candidates (a beam with −inf score is never kept). Unconstrained, it
returns exactly what `decoding.generate(..., DecodeConfig("beam"))` returns.

Keeping the step logic in one object is what makes strict speculative search exact: the verifier
feeds the *same* `BeamSearch` the target's log-probabilities step by step, only computed for many
steps in one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from personalization.atspeed.catalogue import ROOT, Catalogue, constrained_logprobs
from personalization.config import DecodeConfig
from personalization.errors import ConfigError
from personalization.model import SPAModel, Stepper


@dataclass(frozen=True)
class Ranked:
    """A finished hypothesis: generated ids (EOS included) and its length-penalised score."""

    ids: tuple[int, ...]
    score: float


@dataclass(frozen=True)
class Beam:
    """A live beam: generated ids, summed log-probability (a float32 value) and trie node."""

    ids: tuple[int, ...]
    score: float
    node: int = ROOT


@dataclass(frozen=True)
class Candidate:
    """One extension of a live beam: `parent` indexes `BeamSearch.live`."""

    score: float
    parent: int
    token: int


class BeamSearch:
    """One prompt's beam search; feed it each step's log-probabilities until `done`."""

    def __init__(
        self, config: DecodeConfig, eos: frozenset[int], catalogue: Catalogue | None = None
    ):
        self.config = config
        self.eos = eos
        self.catalogue = catalogue
        self.live: list[Beam] = [Beam((), 0.0)]
        self.parents: list[int] = [0]  # each live beam's index in the previous step's live list
        self.finished: list[Ranked] = []
        self.t = 0  # steps taken
        self.done = False
        self.keep = max(2, 1 + len(eos)) * config.num_beams

    @property
    def nodes(self) -> list[int]:
        return [b.node for b in self.live]

    def scores(self) -> Tensor:
        return torch.tensor([b.score for b in self.live], dtype=torch.float32)

    def totals(self, logprobs: Tensor) -> Tensor:
        """Every candidate's summed score [n_live, V], as float32 like `decoding`."""
        return logprobs.float() + self.scores()[:, None]

    def top(self, logprobs: Tensor) -> list[Candidate]:
        """Beam search's candidates: the best `keep` finite ones, best first."""
        totals = self.totals(logprobs).flatten()
        values, index = torch.topk(totals, min(self.keep, totals.numel()))
        V = logprobs.shape[-1]
        return [
            Candidate(float(v), i // V, i % V)
            for v, i in zip(values.tolist(), index.tolist(), strict=True)
            if v != float("-inf")
        ]

    def step(self, logprobs: Tensor) -> None:
        """One beam search step from the live beams' log-probabilities [n_live, V]."""
        self.commit(self.top(logprobs))

    def commit(self, chosen: Sequence[Candidate]) -> None:
        """Advance by the chosen candidates (best first): finish those ending in EOS (only among
        the first K, as transformers does), keep the best K others live, decide whether to stop."""
        cfg, K = self.config, self.config.num_beams
        length = self.t + 1
        last = length == cfg.max_new_tokens
        hits = [last or c.token in self.eos for c in chosen]
        for c, hit in zip(chosen[:K], hits[:K], strict=True):
            if hit:
                ids = self.live[c.parent].ids + (c.token,)
                self.finished.append(Ranked(ids, c.score / length**cfg.length_penalty))
        self.finished = sorted(self.finished, key=lambda h: -h.score)[:K]
        live = [c for c, hit in zip(chosen, hits, strict=True) if not hit][:K]
        self.live = [self._extend(c) for c in live]
        self.parents = [c.parent for c in live]
        self.t = length
        if not live or last:
            self.done = True
            return
        best_possible = live[0].score / length**cfg.length_penalty
        improvable = len(self.finished) < K or best_possible > self.finished[-1].score
        self.done = not improvable or (cfg.early_stopping and len(self.finished) == K)

    def _extend(self, c: Candidate) -> Beam:
        parent = self.live[c.parent]
        node = ROOT if self.catalogue is None else self.catalogue.child(parent.node, c.token)
        return Beam(parent.ids + (c.token,), c.score, node)


@dataclass
class SearchResult:
    hypotheses: list[Ranked]  # best first, at most K
    forward_passes: int  # sequential target passes (prompt included)


def beam_search(
    model: SPAModel, prompt: Sequence[int], config: DecodeConfig, catalogue: Catalogue | None = None
) -> SearchResult:
    """The target's own beam search: one incremental `Stepper` pass per step over all live beams
    (KV caches reordered with the beams), the reference speculative search must reproduce."""
    if not prompt:
        raise ConfigError("the prompt is empty")
    stepper = Stepper(model)
    search = BeamSearch(config, model.backbone.eos_token_ids, catalogue)
    step = stepper.step(torch.tensor([list(prompt)]))
    while True:
        search.step(constrained_logprobs(step.logits, search.nodes, catalogue))
        if search.done:
            break
        stepper.reorder(torch.tensor(search.parents))
        step = stepper.step(torch.tensor([[b.ids[-1]] for b in search.live]))
    return SearchResult(search.finished, stepper.books.steps)
