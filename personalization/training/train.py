"""Training every setting the same way, and calibrating the gate to a communication budget.

Side settings (`lst`, `full`, `choice`, `spa`) train from cached `Features` only — the backbone is
frozen, so its taps, final hidden state and log-probabilities never change and are never
recomputed; gradients reach `g` through the frozen final norm + LM head. `lora` and `adapter`
sit inside the backbone, so they train from token ids with a differentiable backbone pass.

The objective (why, in short):

- **LM loss** on the setting's output: `head(g)` for `lst` and `choice` (whose device branch
  replaces the backbone's), `head(f + g)` for `full` and `spa`. For `spa` the side network is
  trained as if asked at every target token (σ = 1): that is exactly what it returns whenever the
  gate does ask, whereas the paper's soft `f + p·g` would train `g` for a scaling the hard gate
  never applies at inference.
- **Gate loss** (`choice`, `spa`): binary cross-entropy towards a token-level label, "the device's
  answer beats the backbone's": log p_side(y) − log p_backbone(y) > margin (labels from the
  current side network, no gradient). Plus a communication penalty `λ·mean(p)` that breaks ties
  toward the cloud, as the paper's gate "picks the cloud one" when both agree.
- **Calibration** (after training): the threshold is set so that the gate fires on the target
  fraction of tokens — first by the quantile of its probabilities on the validation targets, then
  refined on the tokens it actually sees when generating for the validation prompts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from personalization.config import GATED_SETTINGS, SIDE_SETTINGS, DecodeConfig
from personalization.decoding import generate
from personalization.errors import ConfigError
from personalization.model import SPAModel
from personalization.training.data import Example
from personalization.training.features import Features


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    epochs: int = 15
    batch_size: int = 8
    lr: float = 1e-3  # the paper picks from {2e-4, 5e-4, 1e-3}
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    gate_weight: float = 1.0  # weight of the gate's loss next to the LM loss
    gate_margin: float = 0.1  # nats the device's answer must gain for a "device" label
    comm_penalty: float = 0.05  # λ: cost of mean p(device)
    target_usage: float = 0.5  # the share of tokens the calibrated gate sends to the device

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs and batch_size must be ≥ 1 and lr > 0")
        if not 0 < self.target_usage <= 1:
            raise ConfigError("target_usage must lie in (0, 1]")


@dataclass
class Losses:
    lm: float = 0.0
    gate: float = 0.0
    tokens: int = 0
    device_label: float = 0.0  # share of target tokens labelled "device"

    def add(self, other: dict, n: int) -> None:
        total = self.tokens + n
        for key in ("lm", "gate", "device_label"):
            setattr(self, key, (getattr(self, key) * self.tokens + other[key] * n) / total)
        self.tokens = total


@dataclass
class TrainResult:
    epochs: list[dict] = field(default_factory=list)  # per epoch: train and validation losses


# ---- losses -------------------------------------------------------------------------------------
def side_loss(model: SPAModel, batch: Sequence[Features], cfg: TrainConfig) -> tuple[Tensor, dict]:
    """LM loss of a side setting (+ the gate's loss), from cached features only."""
    dtype = model.side_dtype
    B, T = len(batch), max(f.taps.shape[0] for f in batch)
    R, H = batch[0].taps.shape[1:]
    taps = torch.zeros(B, T, R, H, dtype=dtype)
    for i, f in enumerate(batch):  # right padding: causal attention never looks at it
        taps[i, : f.taps.shape[0]] = model.wire_taps(f.taps)  # as they arrive when serving
    g_all = model.side(taps)
    g = torch.cat([g_all[i, f.start : f.taps.shape[0]] for i, f in enumerate(batch)])
    final = torch.cat([f.final for f in batch]).to(dtype)
    labels = torch.cat([f.labels for f in batch]).long()
    hidden = g if model.setting in ("lst", "choice") else final + g
    logprobs = torch.log_softmax(model.backbone.head(hidden).float(), dim=-1)
    lm = F.nll_loss(logprobs, labels)
    stats = {"lm": lm.item(), "gate": 0.0, "device_label": 0.0}
    if model.setting not in GATED_SETTINGS:
        return lm, stats
    with torch.no_grad():
        base = torch.cat([f.base_logprob for f in batch])
        gain = logprobs.gather(-1, labels[:, None])[:, 0] - base
        label = (gain > cfg.gate_margin).float()
    p = model.gate_prob(final)
    gate = F.binary_cross_entropy(p.float(), label) + cfg.comm_penalty * p.mean()
    stats |= {"gate": gate.item(), "device_label": label.mean().item()}
    return lm + cfg.gate_weight * gate, stats


def adapted_loss(model: SPAModel, batch: Sequence[Example]) -> tuple[Tensor, dict]:
    """LM loss of `lora` / `adapter`: back-propagates through the adapted backbone."""
    adapted = model.adapted
    T = max(len(e.ids) - 1 for e in batch)
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    mask = torch.zeros(len(batch), T, dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.ids) - 1] = torch.tensor(e.ids[:-1])
        mask[i, : len(e.ids) - 1] = 1
    h = adapted.trunk(ids, mask)
    n = [len(e.target) for e in batch]
    hidden = torch.cat([h[i, len(e.ids) - 1 - n[i] : len(e.ids) - 1] for i, e in enumerate(batch)])
    labels = torch.tensor([t for e in batch for t in e.target])
    lm = F.cross_entropy(adapted.head(hidden).float(), labels)
    return lm, {"lm": lm.item(), "gate": 0.0, "device_label": 0.0}


def batch_loss(model: SPAModel, batch: Sequence, cfg: TrainConfig) -> tuple[Tensor, dict, int]:
    if model.adapted is not None:
        loss, stats = adapted_loss(model, batch)
        return loss, stats, sum(len(e.target) for e in batch)
    loss, stats = side_loss(model, batch, cfg)
    return loss, stats, sum(int(f.labels.shape[0]) for f in batch)


# ---- the loop -----------------------------------------------------------------------------------
def make_optimizer(model: SPAModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = list(model.trainable().values())
    if not params:
        raise ConfigError(f"setting {model.setting!r} has nothing to train")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train(
    model: SPAModel,
    data: Sequence,
    cfg: TrainConfig,
    *,
    valid: Sequence = (),
    optimizer: torch.optim.Optimizer | None = None,
    start_epoch: int = 0,
    on_epoch: Callable[[int, torch.optim.Optimizer, dict], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `model`'s setting on `data` (`Features` for side settings, `Example`s for lora and
    adapter) from `start_epoch` to `cfg.epochs`; `on_epoch(epoch, optimizer, losses)` can
    checkpoint and report progress."""
    if model.setting not in SIDE_SETTINGS and model.adapted is None:
        raise ConfigError(f"setting {model.setting!r} has nothing to train")
    if not data:
        raise ConfigError("no training data")
    optimizer = optimizer or make_optimizer(model, cfg)
    params = list(model.trainable().values())
    rng = random.Random(cfg.seed)
    for _ in range(start_epoch):  # a resumed run shuffles as the uninterrupted one would
        rng.random()
    torch.manual_seed(cfg.seed)
    result = TrainResult()
    steps = math.ceil(len(data) / cfg.batch_size)
    for epoch in range(start_epoch, cfg.epochs):
        order = list(range(len(data)))
        random.Random(rng.random() + epoch).shuffle(order)
        seen = Losses()
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress)
        model.train()
        for i in range(0, len(order), cfg.batch_size):
            batch = [data[j] for j in order[i : i + cfg.batch_size]]
            loss, stats, n = batch_loss(model, batch, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            seen.add(stats, n)
            bar.set_postfix(lm=f"{seen.lm:.3f}", gate=f"{seen.gate:.3f}")
            bar.update()
        bar.close()
        model.eval()
        row = {"epoch": epoch + 1, "train": vars(seen)}
        if valid:
            row["valid"] = vars(evaluate_loss(model, valid, cfg))
        result.epochs.append(row)
        if on_epoch is not None:
            on_epoch(epoch + 1, optimizer, row)
    return result


@torch.no_grad()
def evaluate_loss(model: SPAModel, data: Sequence, cfg: TrainConfig) -> Losses:
    losses = Losses()
    for i in range(0, len(data), cfg.batch_size):
        _, stats, n = batch_loss(model, data[i : i + cfg.batch_size], cfg)
        losses.add(stats, n)
    return losses


# ---- calibration --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    target_usage: float
    threshold: float
    usage: float  # the share of generated validation tokens the device shaped at `threshold`

    def as_dict(self) -> dict:
        return vars(self).copy()


@torch.no_grad()
def gate_probs(model: SPAModel, data: Sequence[Features]) -> Tensor:
    """p(device) at every target position of `data` (teacher forcing)."""
    return torch.cat([model.gate_prob(f.final.to(model.side_dtype)) for f in data])


def threshold_for(probs: Tensor, usage: float) -> float:
    """The threshold at which a share `usage` of these probabilities is ≥ it."""
    if usage >= 1:
        return 0.0
    return float(torch.quantile(probs.double(), 1 - usage))


def calibrate(
    model: SPAModel,
    valid: Sequence[Features],
    target_usage: float,
    *,
    prompts: Sequence[Sequence[int]] = (),
    decode: DecodeConfig | None = None,
    rounds: int = 1,
    progress: bool = True,
) -> Calibration:
    """Set `model`'s threshold so the gate fires on `target_usage` of the tokens.

    Teacher-forced validation targets give the first estimate; each round then generates for the
    validation `prompts` and re-takes the quantile over the probabilities seen while generating —
    the distribution the gate actually meets at inference (its own tokens, not the references).
    The usage reported is measured by one more generation pass at the final threshold."""
    if model.setting not in GATED_SETTINGS:
        raise ConfigError(f"setting {model.setting!r} has no gate to calibrate")
    decode = decode or DecodeConfig(max_new_tokens=32)

    def generated_probs(desc: str) -> Tensor:
        seen = []
        for prompt in tqdm(prompts, desc=desc, disable=not progress):
            seen += [t.gate_prob for t in generate(model, prompt, decode)]
        return torch.tensor(seen)

    def use(threshold: float) -> float:
        model.config = replace(model.config, threshold=threshold)
        return threshold

    forced = gate_probs(model, valid)
    threshold = use(threshold_for(forced, target_usage))
    if not prompts:
        return Calibration(target_usage, threshold, float((forced >= threshold).float().mean()))
    for r in range(rounds):
        probs = generated_probs(f"calibrating {r + 1}/{rounds}")
        threshold = use(threshold_for(probs, target_usage))
    usage = float((generated_probs("measuring usage") >= threshold).float().mean())
    return Calibration(target_usage, threshold, usage)
