"""Next-item recommendation: prompts in, the top-K catalogue items out, and metrics.

The target generates items (their item codes: `code_target` builds the prompts) by beam search
constrained to the catalogue's trie, either its own search or speculative search with a draft.
Items are ranked by their catalogue-conditioned log-probability (`catalogue`), with no length
penalty. Recall@K and NDCG@K score the ranks of the user's real next items (AtSpeed's: all of
them are the truth).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from personalization.atspeed.beams import beam_search
from personalization.atspeed.catalogue import Catalogue
from personalization.atspeed.draft import Draft
from personalization.atspeed.speculative import (
    SpeculativeConfig,
    SpeculativeStats,
    TreeSide,
    speculative_beam_search,
)
from personalization.config import RECOMMEND_STRATEGIES, DecodeConfig
from personalization.errors import ConfigError
from personalization.model import SPAModel
from personalization.training.data import DataError, read_jsonl

Strategy = Literal["beam", "speculative-strict", "speculative-relaxed"]
KS = (1, 5, 10, 20)


@dataclass(frozen=True, kw_only=True)
class RecommendConfig:
    strategy: Strategy = "beam"
    k: int = 10  # items returned = beams searched
    gamma: int = 3  # speculative: steps drafted per verification
    draft_beams: int | None = None  # speculative: N ≥ K (None: 2·K)
    seed: int = 0  # speculative-relaxed sampling

    def __post_init__(self):
        if self.strategy not in RECOMMEND_STRATEGIES:
            raise ConfigError(
                f"unknown strategy {self.strategy!r}; "
                f"choose one of {', '.join(RECOMMEND_STRATEGIES)}"
            )
        if self.k < 1:
            raise ConfigError("k must be ≥ 1")

    def decode(self, catalogue: Catalogue) -> DecodeConfig:
        return DecodeConfig(
            strategy="beam",
            max_new_tokens=catalogue.max_length,
            num_beams=self.k,
            length_penalty=0.0,
        )

    def speculative(self) -> SpeculativeConfig:
        verify = "relaxed" if self.strategy == "speculative-relaxed" else "strict"
        return SpeculativeConfig(
            gamma=self.gamma, draft_beams=self.draft_beams, verify=verify, seed=self.seed
        )


@dataclass(frozen=True)
class Recommendation:
    title: str
    score: float  # the item's log-probability among catalogue items


@dataclass
class Recommendations:
    items: list[list[Recommendation]]  # per history, best first
    target_passes: int  # sequential target forward passes, all histories together
    stats: SpeculativeStats | None = field(default=None)  # speculative strategies


@torch.no_grad()
def recommend(
    target: SPAModel,
    catalogue: Catalogue,
    prompts: Sequence[Sequence[int]],
    config: RecommendConfig,
    draft: Draft | None = None,
    side: TreeSide | None = None,
) -> Recommendations:
    """Top-K catalogue items for each prompt (speculative strategies batch all prompts). With
    `side` (the target's side network on a device) beam search runs on the token tree undrafted
    (γ = 0: the same search), so the device is asked once per pass, not once per beam."""
    decode = config.decode(catalogue)
    if config.strategy == "beam" and side is None:
        results = [beam_search(target, p, decode, catalogue) for p in prompts]
        found = [r.hypotheses for r in results]
        passes, stats = sum(r.forward_passes for r in results), None
    else:
        spec = config.speculative() if config.strategy != "beam" else SpeculativeConfig(gamma=0)
        if draft is None and spec.gamma > 0:
            raise ConfigError(f"strategy {config.strategy} needs a draft model")
        result = speculative_beam_search(
            target, draft if spec.gamma else None, prompts, decode, spec, catalogue, side
        )
        found, stats = result.hypotheses, result.stats
        passes = stats.target_passes
    items = [
        [Recommendation(catalogue.title(catalogue.walk(h.ids)), h.score) for h in hyps]
        for hyps in found
    ]
    return Recommendations(items, passes, stats)


def _truth(truth: str | Collection[str]) -> frozenset[str]:
    return frozenset([truth]) if isinstance(truth, str) else frozenset(truth)


def recall_at(titles: Sequence[str], truth: str | Collection[str], k: int) -> float:
    """AtSpeed's Recall@K: true items among the top K ÷ all true items."""
    truth = _truth(truth)
    return len(truth & set(titles[:k])) / len(truth)


def ndcg_at(titles: Sequence[str], truth: str | Collection[str], k: int) -> float:
    """NDCG@K with binary gains; the ideal DCG puts min(|truth|, K) true items first."""
    truth = _truth(truth)
    dcg = sum(1 / math.log2(rank + 2) for rank, t in enumerate(titles[:k]) if t in truth)
    ideal = sum(1 / math.log2(rank + 2) for rank in range(min(len(truth), k)))
    return dcg / ideal


def metrics(
    rankings: Sequence[Sequence[str]], truths: Sequence[str | Collection[str]], k: int
) -> dict[str, float]:
    """Mean Recall@k and NDCG@k over users (a truth is one item or all of a user's items)."""
    n = len(truths)
    if n == 0 or len(rankings) != n or any(not _truth(t) for t in truths):
        raise ConfigError("one ranking per user and a non-empty truth for each")
    pairs = list(zip(rankings, truths, strict=True))
    return {
        f"recall@{k}": sum(recall_at(r, t, k) for r, t in pairs) / n,
        f"ndcg@{k}": sum(ndcg_at(r, t, k) for r, t in pairs) / n,
    }


def load_titles(path: str | Path) -> list[str]:
    """A catalogue file: a JSON list of item titles."""
    path = Path(path)
    try:
        titles = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON list of titles ({exc})") from None
    if not isinstance(titles, list) or not all(isinstance(t, str) for t in titles):
        raise DataError(f"{path}: expected a JSON list of title strings")
    return titles


def user_history(path: str | Path, user: str) -> tuple[list[str], str | None]:
    """A Beauty user's purchases before their test item (history, then validation items), and
    that test item when the file has one."""
    for row in read_jsonl(path):
        if str(row.get("user_id")) == user:
            history = list(row.get("history", [])) + list(row.get("valid", []))
            test = row.get("test") or [None]
            return history, test[0]
    raise DataError(f"{path}: no user {user!r}")
