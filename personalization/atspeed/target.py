"""The trained recommendation target: a plug-in on the frozen backbone, fitted to next-item
generation on Beauty before any speculative search runs on it (AtSpeed fine-tunes its target
first; a zero-shot 135M backbone recommends nothing right).

The plug-in is one of the project's own settings — a side network always on (`full`), the gated
side network (`spa`), or LoRA (`lora`) — trained by `training.experiment.fit` on the training
users' purchase sequences (each purchase from the ones before it). The validation and test users
of the same seeded split are held out, and so are every user's validation and test items. A
trained target is cached under `$SPA_CACHE_DIR/targets`, named by the backbone's fingerprint and
the config; the last one trained for a backbone becomes its default (`default_target`), which
`spa recommend` uses unless told otherwise.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from personalization.backbone.embedded import cache_dir
from personalization.backbone.frozen import Backbone
from personalization.config import Setting
from personalization.errors import ConfigError
from personalization.files import atomic_path
from personalization.training.data import records_hash
from personalization.training.experiment import DataConfig, Prepared, fit, prepare_data
from personalization.training.train import TrainConfig

TARGET_SETTINGS = ("full", "spa", "lora")


@dataclass(frozen=True, kw_only=True)
class TargetConfig:
    setting: Setting = "full"
    epochs: int = 4
    lr: float = 1e-3
    batch_size: int = 8
    train_users: int | None = None  # None: every user not held out
    windows: int | None = 3  # each training user's last purchases trained on (None: every one)
    valid_users: int = 100  # held out: the validation loss (and the `spa` gate's calibration)
    test_users: int = 500  # held out: what benchmarks/recommend.py scores
    max_prompt_tokens: int = 512  # as `recommend.history_prompt`
    seed: int = 0

    def __post_init__(self):
        if self.setting not in TARGET_SETTINGS:
            raise ConfigError(
                f"a recommendation target is one of {', '.join(TARGET_SETTINGS)}, "
                f"not {self.setting!r}"
            )

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def data(self, path: str | Path) -> DataConfig:
        return DataConfig(
            path=str(path),
            dataset="beauty",
            seed=self.seed,
            train_size=self.train_users,
            valid_size=self.valid_users,
            test_size=self.test_users,
            max_prompt_tokens=self.max_prompt_tokens,
        )

    def train(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed
        )


def targets_dir() -> Path:
    return cache_dir() / "targets"


def target_path(backbone: Backbone, cfg: TargetConfig) -> Path:
    return targets_dir() / f"{backbone.fingerprint[:16]}-{cfg.setting}-{cfg.key()}.safetensors"


def _pointer(backbone: Backbone) -> Path:
    return targets_dir() / f"{backbone.fingerprint[:16]}-default.json"


def default_target(backbone: Backbone) -> Path | None:
    """The target last trained to completion for this backbone, if any."""
    try:
        path = Path(json.loads(_pointer(backbone).read_text())["checkpoint"])
    except (OSError, ValueError, KeyError):
        return None
    return path if path.is_file() else None


def prepare(backbone: Backbone, data: str | Path, cfg: TargetConfig) -> Prepared:
    """The split's examples; of each training user, the last `cfg.windows` purchases (each from
    the ones before it) — the backbone's features of every window would cost hours of CPU."""
    prepared = prepare_data(backbone, cfg.data(data))
    if cfg.windows is None:
        return prepared
    records, examples = prepared.splits.train, prepared.train
    seen: dict[str, int] = {}
    keep = []
    for i in reversed(range(len(records))):
        seen[records[i].user] = seen.get(records[i].user, 0) + 1
        if seen[records[i].user] <= cfg.windows:
            keep.append(i)
    keep.reverse()
    train = [records[i] for i in keep]
    splits = replace(prepared.splits, train=train)
    return replace(
        prepared, splits=splits, train=[examples[i] for i in keep], data_hash=records_hash(train)
    )


def train_target(
    backbone: Backbone, data: str | Path, cfg: TargetConfig, *, progress: bool = True
) -> Path:
    """Train (or finish training) the target for `cfg` and make it the backbone's default; a
    target already trained is returned as it is."""
    out = target_path(backbone, cfg)
    pointer = _pointer(backbone)
    done = out.with_suffix(".json")
    if not (out.is_file() and done.is_file()):
        out.parent.mkdir(parents=True, exist_ok=True)
        prepared = prepare(backbone, data, cfg)
        result = fit(
            backbone, prepared, cfg.setting, cfg.train(), out, resume=True, progress=progress
        )
        record = {
            "checkpoint": str(out),
            "config": asdict(cfg),
            "data": str(data),
            "train_examples": len(prepared.train),
            "epochs": result.epochs,
        }
        with atomic_path(done) as tmp:
            tmp.write_text(json.dumps(record, indent=1))
    with atomic_path(pointer) as tmp:
        tmp.write_text(done.read_text())
    return out
