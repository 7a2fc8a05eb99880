"""Generation-quality and communication metrics of one setting on a test split.

Rouge-L (F-measure × 100, `rouge-score` with stemming) against the references; from the decoding
books: gate usage (share of generated tokens the device shaped), M (device round trips per
decoding step), bytes per generated token, and the paper's latency model (eqs. 4–6) per token for
a network profile: measured cloud and device compute plus T_net = M·τ + bytes/bandwidth.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from rouge_score import rouge_scorer
from tqdm.auto import tqdm

from personalization.config import DecodeConfig
from personalization.decoding import generate
from personalization.latency import Books, NetworkProfile, t_net
from personalization.model import SPAModel
from personalization.training.data import Example


@functools.cache
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reference: str, text: str) -> float:
    """Rouge-L F-measure × 100 (`rouge-score`, stemmed): the one scorer every figure uses."""
    return 100 * _scorer().score(reference, text)["rougeL"].fmeasure


def bootstrap_interval(
    values: Sequence[float], *, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of the mean of `values`."""
    if not values:
        return (float("nan"), float("nan"))
    x = torch.tensor(values, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    means = x[torch.randint(len(x), (resamples, len(x)), generator=g)].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(low), float(high)


@dataclass(frozen=True)
class EvalReport:
    setting: str
    dataset: str
    examples: int
    rouge_l: float
    usage: float
    m: float
    bytes_per_token: float
    trainable_pct: float
    profile: str
    t_cloud_ms: float  # per generated token
    t_device_ms: float
    t_net_ms: float  # latency model for `profile`
    t_total_ms: float
    threshold: float | None = None
    target_usage: float | None = None  # the budget the threshold was calibrated to
    scores: tuple[float, ...] = ()  # Rouge-L of each example (for bootstrap intervals)

    def rouge_l_interval(self, *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
        """Bootstrap 95 % interval of the mean Rouge-L over the examples."""
        return bootstrap_interval(self.scores, resamples=resamples, seed=seed)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    HEADER = (
        "setting",
        "dataset",
        "n",
        "Rouge-L",
        "usage",
        "M",
        "bytes/tok",
        "trainable %",
        "T_total ms/tok",
    )

    def row(self) -> tuple[str, ...]:
        return (
            self.setting,
            self.dataset,
            str(self.examples),
            f"{self.rouge_l:.2f}",
            f"{self.usage:.2f}",
            f"{self.m:.2f}",
            f"{self.bytes_per_token:,.0f}",
            f"{self.trainable_pct:.3f}",
            f"{self.t_total_ms:.1f} ({self.profile})",
        )


def table(reports: Sequence[EvalReport]) -> str:
    """A Markdown table of reports."""
    rows = [EvalReport.HEADER, *(r.row() for r in reports)]
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(EvalReport.HEADER))
    return "\n".join(lines)


def evaluate(
    model: SPAModel,
    examples: Sequence[Example],
    references: Sequence[str],
    *,
    dataset: str,
    profile: NetworkProfile,
    decode: DecodeConfig | None = None,
    progress: bool = True,
) -> EvalReport:
    """Generate for every example's prompt and score against its reference."""
    decode = decode or DecodeConfig()
    total, scores = Books(), []
    for example, reference in tqdm(
        list(zip(examples, references, strict=True)),
        desc=f"eval {model.setting}",
        disable=not progress,
    ):
        generation = generate(model, example.prompt, decode)
        for _ in generation:
            pass
        scores.append(rouge_l(reference, generation.text))
        for key, value in vars(generation.books).items():
            setattr(total, key, getattr(total, key) + value)
    n = max(total.tokens, 1)
    net = t_net(total.contacts, total.bytes_to_device, total.bytes_from_device, profile)
    ms = 1000 / n
    return EvalReport(
        setting=model.setting,
        dataset=dataset,
        examples=len(examples),
        rouge_l=sum(scores) / max(len(examples), 1),
        scores=tuple(scores),
        usage=total.device_tokens / n,
        m=total.m,
        bytes_per_token=(total.bytes_to_device + total.bytes_from_device) / n,
        trainable_pct=100 * model.trainable_parameters() / model.backbone.num_parameters,
        profile=profile.name,
        t_cloud_ms=total.t_cloud * ms,
        t_device_ms=total.t_device * ms,
        t_net_ms=net * ms,
        t_total_ms=(total.t_cloud + total.t_device + net) * ms,
        threshold=model.config.threshold if model.setting in ("choice", "spa") else None,
    )
