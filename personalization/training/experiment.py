"""One training or evaluation run end to end: data file → examples → cached features → trained,
calibrated, checkpointed model → metrics. What `spa train` and `spa eval` call."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from personalization.backbone.frozen import Backbone
from personalization.config import (
    DEFAULT_TAP_ENCODING,
    GATED_SETTINGS,
    DecodeConfig,
    SideConfig,
    SPAConfig,
    TapEncoding,
)
from personalization.errors import ConfigError
from personalization.latency import NetworkProfile
from personalization.model import SPAModel
from personalization.training.checkpoint import describe, load_checkpoint, save_checkpoint
from personalization.training.data import Example, Splits, load_splits, records_hash, to_examples
from personalization.training.evaluate import EvalReport, evaluate
from personalization.training.features import FeatureCache, make_cache
from personalization.training.train import (
    Calibration,
    TrainConfig,
    calibrate,
    make_optimizer,
    train,
)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    path: str
    dataset: str | None = None  # default: the file's stem
    seed: int = 0
    train_size: int | None = None  # records, or users for personachat / beauty; None = all
    valid_size: int = 50
    test_size: int = 100
    max_prompt_tokens: int = 512
    max_target_tokens: int = 64


@dataclass
class Prepared:
    splits: Splits
    train: list[Example]
    valid: list[Example]
    test: list[Example]
    data_hash: str


def prepare_data(backbone: Backbone, cfg: DataConfig) -> Prepared:
    splits = load_splits(
        cfg.path,
        cfg.dataset,
        seed=cfg.seed,
        train=cfg.train_size,
        valid=cfg.valid_size,
        test=cfg.test_size,
    )
    kw = dict(
        max_prompt_tokens=cfg.max_prompt_tokens,
        max_target_tokens=cfg.max_target_tokens,
        keep=splits.keep,
    )
    return Prepared(
        splits,
        to_examples(backbone, splits.train, **kw),
        to_examples(backbone, splits.valid, **kw),
        to_examples(backbone, splits.test, **kw),
        records_hash(splits.train),
    )


@dataclass
class FitResult:
    model: SPAModel
    epochs: list[dict]
    calibration: Calibration | None
    backbone_passes: int  # examples the feature cache had to compute
    seconds: dict[str, float] = field(default_factory=dict)


def fit(
    backbone: Backbone,
    data: Prepared,
    setting: str,
    cfg: TrainConfig,
    out: str | Path,
    *,
    side: SideConfig | None = None,
    tap_encoding: TapEncoding = DEFAULT_TAP_ENCODING,
    resume: bool = False,
    cache_root: str | Path | None = None,
    calibration_prompts: int = 30,
    calibrate_gate: bool = True,
    progress: bool = True,
) -> FitResult:
    """Train `setting` on `data.train`, calibrate its gate on `data.valid`, save to `out`
    (after every epoch, so an interrupted run resumes with `resume=True`).
    `calibrate_gate=False` skips calibration (it generates from `calibration_prompts` validation
    prompts): a learning-rate sweep calibrates only the rate it keeps (`assess(target_usage=…)`)."""
    seconds: dict[str, float] = {}
    start_epoch, optimizer = 0, None
    if resume and Path(out).is_file():
        model, info, optim = load_checkpoint(out, backbone)
        if info.spa.setting != setting:
            raise ConfigError(f"{out} holds setting {info.spa.setting!r}, not {setting!r}")
        start_epoch = info.epoch
        if start_epoch > cfg.epochs:
            raise ConfigError(
                f"{out} has trained {start_epoch} epochs, more than the {cfg.epochs} asked for; "
                "move it away to train afresh"
            )
        optimizer = make_optimizer(model, cfg)
        if optim:
            optimizer.load_state_dict(optim)
    else:
        model = SPAModel(backbone, SPAConfig(setting=setting, tap_encoding=tap_encoding), side)
    optimizer = optimizer or make_optimizer(model, cfg)
    cache: FeatureCache | None = None
    passes = 0
    t = time.perf_counter()
    if model.adapted is None:
        cache = make_cache(backbone, model.rungs, model.config.wire_dtype, cache_root)
        passes = cache.ensure(data.train + data.valid, progress=progress)
        train_data, valid_data = cache.lazy(data.train), cache.lazy(data.valid)
    else:
        train_data, valid_data = data.train, data.valid
    seconds["features"] = time.perf_counter() - t

    meta = dict(data_hash=data.data_hash, train=asdict(cfg))

    def checkpoint(epoch: int, opt, _losses: dict) -> None:
        save_checkpoint(out, model, describe(model, epoch=epoch, **meta), opt)

    t = time.perf_counter()
    result = train(
        model,
        train_data,
        cfg,
        valid=valid_data,
        optimizer=optimizer,
        start_epoch=start_epoch,
        on_epoch=checkpoint,
        progress=progress,
    )
    seconds["train"] = time.perf_counter() - t
    calibration = None
    if calibrate_gate and model.setting in GATED_SETTINGS:
        t = time.perf_counter()
        calibration = calibrate(
            model,
            valid_data,
            cfg.target_usage,
            prompts=[e.prompt for e in data.valid[:calibration_prompts]],
            decode=DecodeConfig(max_new_tokens=data.splits.max_new_tokens),
            progress=progress,
        )
        seconds["calibrate"] = time.perf_counter() - t
        meta["calibration"] = calibration.as_dict()
        save_checkpoint(out, model, describe(model, epoch=cfg.epochs, **meta), optimizer)
    return FitResult(model, result.epochs, calibration, passes, seconds)


def assess(
    model: SPAModel,
    data: Prepared,
    profile: NetworkProfile,
    *,
    target_usage: float | None = None,
    cache_root: str | Path | None = None,
    max_new_tokens: int | None = None,
    calibration_prompts: int = 30,
    progress: bool = True,
) -> tuple[EvalReport, Calibration | None]:
    """Evaluate on the test split, first re-calibrating the gate to `target_usage` if given (on
    the validation split, as `fit` does: its first `calibration_prompts` prompts)."""
    calibration = None
    decode = DecodeConfig(max_new_tokens=max_new_tokens or data.splits.max_new_tokens)
    if target_usage is not None and model.setting in GATED_SETTINGS:
        cache = make_cache(model.backbone, model.rungs, model.config.wire_dtype, cache_root)
        cache.ensure(data.valid, progress=progress)
        calibration = calibrate(
            model,
            cache.lazy(data.valid),
            target_usage,
            prompts=[e.prompt for e in data.valid[:calibration_prompts]],
            decode=decode,
            progress=progress,
        )
    references = [r.output for r in data.splits.test]
    report = evaluate(
        model,
        data.test,
        references,
        dataset=data.splits.dataset,
        profile=profile,
        decode=decode,
        progress=progress,
    )
    return report, calibration
