"""The recommendation target on item codes: frozen backbone, code tokens, a trained side network.

A history is the user's last ≤ 20 items as codes after a short instruction, oldest first; the
target generates the next item's L code tokens by beam search over the trie of valid codes, so
every output is a real item. The plug-in — code rows (`coded`) and a side network whose output
alone feeds the head (`lst`, the default), or is added to the backbone's (`full`) or gated
(`spa`) — is trained centrally on AtSpeed's time split (`split`): every user's
purchases before the validation period, all of a user's next-item positions from **one** causal
pass (an item's codes are predicted from every item before it, exactly what a window ending there
would see). The epoch kept is the one with the lowest loss on the validation items.

The target's own searches may lean toward the user's last purchases (`HistoryPrior`): a logit
bonus for every code prefix those items have, so items whose titles resemble what was just bought
(codes are built from titles) rise — what the content baseline does, inside the generative
search. Its weight is chosen on the validation items and kept in the target's record.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from personalization.atspeed.catalogue import ROOT, Catalogue
from personalization.atspeed.coded import coded_backbone
from personalization.atspeed.codes import CodeConfig, ItemCodes, catalogue_hash
from personalization.atspeed.draft import Draft
from personalization.atspeed.prompts import INSTRUCTION, CodePrompts
from personalization.atspeed.recommend import Recommendations, RecommendConfig, recommend
from personalization.atspeed.speculative import TreeSide
from personalization.atspeed.split import User
from personalization.backbone.embedded import cache_dir
from personalization.backbone.frozen import Backbone
from personalization.config import SideConfig, SPAConfig
from personalization.errors import ConfigError
from personalization.files import atomic_path
from personalization.model import SPAModel
from personalization.training.checkpoint import (
    describe,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from personalization.training.data import Example
from personalization.training.features import make_cache
from personalization.training.train import TrainConfig, make_optimizer, train

SETTINGS = ("full", "lst", "spa")


@dataclass(frozen=True, kw_only=True)
class CodeTargetConfig:
    # lst: the codes' head reads g alone. The backbone's f(x) over code tokens (ids it never
    # saw in pre-training) only adds a large offset g must first cancel: on Beauty's validation
    # items, lst reached a lower loss in 8 epochs (3.97) than full in 20 (4.11), and validation
    # Recall@10 0.012 vs 0.004 (300 users).
    setting: str = "lst"
    epochs: int = 20  # the most trained; the best on validation is kept
    lr: float = 3e-3  # chosen on Beauty's validation items from {1e-3, 3e-3}
    batch_size: int = 16
    reduction: int = 4  # side width H / r
    seed: int = 0

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise ConfigError(
                f"a code target is one of {', '.join(SETTINGS)}, not {self.setting!r}"
            )

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True, kw_only=True)
class HistoryPrior:
    """A logit bonus for the code prefixes of the user's most recent purchases (0: none)."""

    weight: float = 0.0  # bonus per residual level an item shares with a recent purchase
    recent: int = 2  # purchases that count, newest first
    decay: float = 0.9  # each earlier purchase's bonus × decay

    def __post_init__(self):
        if self.weight < 0 or self.recent < 1 or not 0 < self.decay <= 1:
            raise ConfigError("a history prior needs weight ≥ 0, recent ≥ 1 and 0 < decay ≤ 1")


class CodeRecommender:
    """Codes, their catalogue trie and the coded backbone; `model` is the target (or None)."""

    @classmethod
    def build(cls, backbone: Backbone, codes: ItemCodes) -> CodeRecommender:
        """For a plain backbone: its coded version for these codes, no target yet."""
        return cls(codes, coded_backbone(backbone, codes))

    def __init__(
        self,
        codes: ItemCodes,
        coded: Backbone,
        model: SPAModel | None = None,
        prior: HistoryPrior = HistoryPrior(),
    ):
        self.codes = codes
        self.prior = prior  # the target's own searches only
        self.backbone = coded  # `coded_backbone` of the shared backbone for these codes
        self.vocab = self.backbone.vocab_size - codes.num_tokens
        self.catalogue = Catalogue(
            (codes.token_ids(i, self.vocab) for i in range(len(codes))), codes.titles
        )
        self.model = model
        instruction = self.backbone.tokenizer(INSTRUCTION)["input_ids"]
        self.prompts = CodePrompts(codes, self.vocab, instruction)
        self.index = self.prompts.index
        self.item_ids, self.tokens = self.prompts.item_ids, self.prompts.tokens
        self.prompt, self.sequence_example = self.prompts.prompt, self.prompts.sequence_example

    def with_target(self, path: str | Path) -> CodeRecommender:
        """The same codes with a trained target on this coded backbone; refuses other codes'."""
        info, _, _ = read_checkpoint(path)
        if info.data_hash != self.codes.fingerprint:
            raise ConfigError(
                f"{path} was trained on item codes {info.data_hash}, not on these "
                f"({self.codes.fingerprint})"
            )
        model, _, _ = load_checkpoint(path, self.backbone)
        prior = HistoryPrior(**_record(path).get("prior", {}))
        return CodeRecommender(self.codes, self.backbone, model.eval(), prior)

    def prior_bonus(self, history: Sequence[str], prior: HistoryPrior) -> dict[int, float]:
        """Trie node → bonus: each residual-level prefix of the last `recent` known purchases
        gets `weight` (× decay per older purchase; the largest where prefixes meet)."""
        known = [t for t in history if t in self.index][-prior.recent :]
        bonus: dict[int, float] = {}
        for age, title in enumerate(reversed(known)):
            value, node = prior.weight * prior.decay**age, ROOT
            for token in self.tokens([title])[: self.codes.config.levels]:
                node = self.catalogue.child(node, token)
                bonus[node] = max(bonus.get(node, 0.0), value)
        return bonus

    def recommend(
        self,
        history: Sequence[str],
        config: RecommendConfig,
        draft: Draft | None = None,
        *,
        exclude_purchased: bool = True,
        model: SPAModel | None = None,
        side: TreeSide | None = None,
        prior: HistoryPrior | None = None,
    ) -> Recommendations:
        """The top K for one history, by the target (or `model`: a device's side network on
        this coded backbone, with `side`). With `exclude_purchased`, no item of the history is
        recommended (no test purchase on Beauty repeats an earlier one; validation chose it).
        The target's own searches use its history prior (or `prior`); a device's use none."""
        if model is None and self.model is None:
            raise ConfigError("no trained target: load one (with_target) first")
        catalogue = self.catalogue.without(history) if exclude_purchased else self.catalogue
        prior = prior or (self.prior if model is None else HistoryPrior())
        if prior.weight > 0:
            catalogue = catalogue.with_prior(self.prior_bonus(history, prior))
        model = model or self.model
        return recommend(model, catalogue, [self.prompt(history)], config, draft, side)

    def label(self, title: str) -> str:
        return self.codes.label(self.index[title])

    def training_examples(self, users: Sequence[User]) -> list[Example]:
        """Each user's history, every next-item position in one pass (the last ≤ 21 items)."""
        return [e for u in users if (e := self.prompts.history_example(u.history)) is not None]

    def validation_examples(self, users: Sequence[User]) -> list[Example]:
        """The validation items after each user's history (model selection only)."""
        examples = (self.prompts.later_example(u.history, u.valid) for u in users)
        return [e for e in examples if e is not None]


@dataclass
class TrainedTarget:
    path: Path
    best_epoch: int
    epochs: list[dict] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)


def target_path(coded: Backbone, codes: ItemCodes, cfg: CodeTargetConfig) -> Path:
    """Named by the coded backbone (the backbone's weights and the code rows), the codes and
    the config."""
    name = f"{coded.fingerprint[:16]}-codes{codes.fingerprint[:10]}-{cfg.key()}.safetensors"
    return cache_dir() / "targets" / name


def _pointer(backbone: Backbone, titles: Sequence[str]) -> Path:
    name = f"{backbone.fingerprint[:16]}-catalogue{catalogue_hash(titles)}-default.json"
    return cache_dir() / "targets" / name


def default_code_target(
    backbone: Backbone, titles: Sequence[str]
) -> tuple[Path, CodeConfig] | None:
    """The target last trained to completion for this backbone and catalogue, and the config
    of the codes it was trained on; None when there is none."""
    try:
        row = json.loads(_pointer(backbone, titles).read_text())
        path, config = Path(row["checkpoint"]), CodeConfig(**row["codes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (path, config) if path.is_file() else None


def train_code_target(
    backbone: Backbone,
    codes: ItemCodes,
    users: Sequence[User],
    cfg: CodeTargetConfig,
    *,
    out: Path | None = None,
    progress: bool = True,
) -> TrainedTarget:
    """Train (or return the finished) target and make it the default for these codes; `out`
    keeps the best epoch, `out.json` the record."""
    rec = CodeRecommender.build(backbone, codes)
    out = out or target_path(rec.backbone, codes, cfg)
    record = out.with_suffix(".json")
    if out.is_file() and record.is_file():
        row = json.loads(record.read_text())
        make_default(backbone, codes, out)
        return TrainedTarget(out, row["best_epoch"], row["epochs"], row["seconds"])
    seconds = {}
    t = time.perf_counter()
    model = SPAModel(
        rec.backbone,
        SPAConfig(setting=cfg.setting),
        SideConfig(
            hidden_size=backbone.hidden_size,
            num_layers=backbone.num_layers,
            reduction=cfg.reduction,
        ),
    )
    train_ex, valid_ex = rec.training_examples(users), rec.validation_examples(users)
    cache = make_cache(rec.backbone, model.rungs, model.config.wire_dtype)
    cache.ensure(train_ex + valid_ex, progress=progress)
    seconds["features"] = time.perf_counter() - t
    best = {"loss": float("inf"), "epoch": 0}
    meta = {
        "train": asdict(
            TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed)
        ),
        "codes": codes.fingerprint,
    }

    def keep_best(epoch: int, _opt, row: dict) -> None:
        if row["valid"]["lm"] < best["loss"]:
            best.update(loss=row["valid"]["lm"], epoch=epoch)
            save_checkpoint(
                out,
                model,
                describe(model, epoch=epoch, data_hash=meta["codes"], train=meta["train"]),
            )

    t = time.perf_counter()
    tc = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed)
    result = train(
        model,
        cache.lazy(train_ex),
        tc,
        valid=cache.lazy(valid_ex),
        optimizer=make_optimizer(model, tc),
        on_epoch=keep_best,
        progress=progress,
    )
    seconds["train"] = time.perf_counter() - t
    row = {
        "config": asdict(cfg),
        "codes": codes.fingerprint,
        "codes_config": asdict(codes.config),
        "best_epoch": best["epoch"],
        "epochs": result.epochs,
        "seconds": seconds,
        "train_examples": len(train_ex),
        "valid_examples": len(valid_ex),
    }
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps(row, indent=1))
    make_default(backbone, codes, out)
    return TrainedTarget(out, best["epoch"], result.epochs, seconds)


def _record(path: str | Path) -> dict:
    """The training record beside a target's checkpoint ({} where there is none)."""
    try:
        return json.loads(Path(path).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}


def keep_prior(path: str | Path, prior: HistoryPrior) -> None:
    """Record the history prior chosen for a trained target (its searches use it from now on)."""
    record = Path(path).with_suffix(".json")
    row = {**_record(path), "prior": asdict(prior)}
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps(row, indent=1))


def make_default(backbone: Backbone, codes: ItemCodes, path: Path) -> None:
    """Make `path` the target `default_code_target` finds for this backbone and catalogue."""
    with atomic_path(_pointer(backbone, codes.titles)) as tmp:
        tmp.write_text(json.dumps({"checkpoint": str(path), "codes": asdict(codes.config)}))


def load_code_target(path: str | Path, backbone: Backbone, codes: ItemCodes) -> CodeRecommender:
    """A trained target on `backbone` (the plain one; its code rows are rebuilt from the seed)."""
    return CodeRecommender.build(backbone, codes).with_target(path)
