"""Training the private side network against the remote frozen backbone.

history → records → token ids (the cloud's tokenizer, `/v1/tokenize`) → taps and backbone signals
(`/v1/features`, cached on the device by content, so a second run or a resumed one fetches
nothing) → `personalization.training.train` on a `FrozenHead` (final norm + LM head from
`/v1/head`: the device never holds the backbone's layers) → gate calibrated to a usage budget →
checkpoint (atomic, every epoch, so a crash resumes from the last one).

Calibration starts from the quantile of the gate's probabilities on the held-out items' targets
and is then refined on the probabilities the cloud reports while actually generating for the
held-out prompts with this gate (the distribution the gate meets at inference); the usage it
reports is measured on those generated tokens.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open

from device_agent.client import CloudClient
from device_agent.errors import DeviceError
from device_agent.generation import RemoteGeneration
from device_agent.history import PURCHASE, to_record
from device_agent.purchases import CODE_SETTINGS, CodeBook
from device_agent.store import Store, TrainingRun
from personalization.backbone.head import FrozenHead
from personalization.codecs import BASIS_RANK, Basis
from personalization.config import (
    DEFAULT_TAP_ENCODING,
    GATED_SETTINGS,
    SIDE_SETTINGS,
    DecodeConfig,
    SideConfig,
    SPAConfig,
    TapEncoding,
    WireDtype,
)
from personalization.files import read_safetensors
from personalization.model import SPAModel
from personalization.training.checkpoint import (
    describe,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from personalization.training.data import Example
from personalization.training.features import FeatureCache, Features, FeatureSource, source_id
from personalization.training.train import TrainConfig, make_optimizer, threshold_for, train


@dataclass(frozen=True, kw_only=True)
class DeviceTrainConfig:
    """What a device trains and how (the optimisation itself: `train`)."""

    setting: str = "spa"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=15))
    reduction: int = 8  # side width H / r
    rungs: tuple[int, ...] = ()  # () = the backbone's default (about L/4)
    wire_dtype: WireDtype = "float16"
    tap_encoding: TapEncoding = DEFAULT_TAP_ENCODING  # how taps cross the wire; training too
    # text: every history item as a prompt/response; codes: the purchases as the cloud's item
    # codes (`purchases`), for recommendation
    target: Literal["text", "codes"] = "text"
    valid_fraction: float = 0.2  # held-out share of the history (calibration, validation loss)
    max_prompt_tokens: int = 384
    max_target_tokens: int = 64
    keep: str = "end"  # an over-long input keeps its most recent end
    calibration_prompts: int = 8  # held-out prompts generated through the cloud to refine σ
    calibration_tokens: int = 24

    def __post_init__(self):
        if self.target == "codes" and self.setting not in CODE_SETTINGS:
            raise DeviceError(
                f"training on item codes: setting one of {', '.join(CODE_SETTINGS)} (the "
                f"recommender's), not {self.setting!r}"
            )
        if self.setting not in SIDE_SETTINGS:
            raise DeviceError(
                f"a device trains a side network: setting one of {', '.join(SIDE_SETTINGS)}, "
                f"not {self.setting!r}"
            )

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DeviceTrainConfig:  # (a run recorded before `target`: text)
        return cls(**{**d, "train": TrainConfig(**d["train"]), "rungs": tuple(d["rungs"])})


@dataclass(frozen=True)
class Progress:
    """A training milestone, for a progress bar or a live loss curve."""

    stage: str  # tokenize | features | epoch | calibrate | done
    done: int
    total: int
    info: dict = field(default_factory=dict)


class RemoteFeatures(FeatureSource):
    """`Features` from the cloud's features endpoint, batched within the server's limit."""

    def __init__(
        self, client: CloudClient, rungs: Sequence[int], dtype: str, codes: CodeBook | None = None
    ):
        info = client.info()
        self.client, self.rungs, self.dtype = client, tuple(rungs), dtype
        self.codes = None if codes is None else codes.fingerprint
        self.batch = int(info.limits["features_max_batch"])
        fingerprint = info.fingerprint if codes is None else codes.published.backbone_fingerprint
        self.source_id = source_id(fingerprint, self.rungs, dtype)

    def __call__(self, examples: Sequence[Example]) -> list[Features]:
        out: list[Features] = []
        for i in range(0, len(examples), self.batch):
            features, meta = self.client.features(
                examples[i : i + self.batch], self.rungs, self.dtype, self.codes
            )
            if meta.get("source_id") != self.source_id:  # the cloud's backbone changed under us
                raise DeviceError(
                    "the cloud's backbone changed during training (features from "
                    f"{meta.get('source_id')}, expected {self.source_id}); train again"
                )
            out += features
        return out


def remote_cache(
    client: CloudClient,
    rungs: Sequence[int],
    dtype: str,
    root: str | Path,
    codes: CodeBook | None = None,
) -> FeatureCache:
    """The device's feature cache (under its store), filled from the cloud: one for training and
    evaluation alike, so what one fetched the other finds (cf. `features.make_cache`)."""
    return FeatureCache(RemoteFeatures(client, rungs, dtype, codes), root)


def frozen_head(client: CloudClient, store: Store, codes: CodeBook | None = None) -> FrozenHead:
    """The backbone's head (over item codes: `codes`) and the public basis of its taps (what
    low-rank tap encodings need), each fetched once per weight fingerprint and kept in the
    store."""
    text = client.facts()
    facts = text if codes is None else codes.facts(text)
    path = store.path(f"head/{facts.fingerprint}.safetensors")
    if not path.is_file():
        client.head(path, "float32", None if codes is None else codes.fingerprint)
    with safe_open(path, "pt") as f:  # memory-mapped: the head is the device's largest tensor
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    name = f"lowrank{BASIS_RANK}-int8"
    basis_path = store.path(f"codec/{text.fingerprint}-{name}.safetensors")
    if not basis_path.is_file():
        client.codec(basis_path, name)
    _meta, b = read_safetensors(basis_path, DeviceError, "tap-encoding basis")
    basis = Basis(tuple(range(1, facts.num_layers + 1)), b["mean"], b["vectors"])
    eps = float(meta.get("eps") or 1e-5)
    offset = int(meta.get("offset") or 0)
    return FrozenHead(facts, tensors, meta.get("norm", ""), eps, basis, offset)


def train_device(
    store: Store,
    client: CloudClient,
    cfg: DeviceTrainConfig | None = None,
    *,
    resume: bool = False,
    warm: bool = False,
    initial: dict[str, torch.Tensor] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    progress: bool = False,
) -> TrainingRun:
    """Train on the stored history; returns the finished run (see the module docstring).
    `resume=True` continues the newest unfinished run from its last checkpoint. A new run starts
    from a seeded initialisation (the same on every device), or with `warm=True` from the newest
    checkpoint of its setting; `initial` then overrides parameters by name (a federated round's
    shared weights)."""
    notify = on_progress or (lambda _p: None)
    run = _unfinished(store) if resume else None
    if resume and run is None:
        raise DeviceError("no unfinished training run to resume")
    cfg = DeviceTrainConfig.from_dict(run.config) if run else (cfg or DeviceTrainConfig())
    items = store.items()
    if not items:
        raise DeviceError("the history is empty: add or import items first (`spa device history`)")
    seconds: dict[str, float] = {}
    codes = CodeBook.fetch(client) if cfg.target == "codes" else None
    head = frozen_head(client, store, codes)

    t = time.perf_counter()
    notify(Progress("tokenize", 0, len(items)))
    if codes is not None:
        titles = [i.output for i in items if i.kind == PURCHASE]
        train_ex, valid_ex = codes.examples(titles, cfg.valid_fraction)
        examples = train_ex + valid_ex
    else:
        texts = [to_record(i) for i in items if i.kind != PURCHASE]
        if not texts:
            raise DeviceError(
                "the history holds only purchases: train on them as item codes "
                "(`spa device train --target codes`)"
            )
        examples = client.tokenize(
            texts,
            max_prompt_tokens=cfg.max_prompt_tokens,
            max_target_tokens=cfg.max_target_tokens,
            keep=cfg.keep,
        )
        train_ex, valid_ex = _split(examples, cfg.valid_fraction, cfg.train.seed)
    notify(Progress("tokenize", len(items), len(items)))

    if run is None:
        run = store.start_run(cfg.setting, cfg.as_dict())
        store.update_run(run.id, examples=len(train_ex), valid_examples=len(valid_ex))
    ckpt = store.path(f"checkpoints/run-{run.id}.safetensors")
    start_epoch, optim_state = 0, {}
    if resume and ckpt.is_file():
        model, info, optim_state = load_checkpoint(ckpt, head)
        start_epoch = info.epoch
    else:
        model = start_model(store, head, cfg, warm, initial or {})
    optimizer = make_optimizer(model, cfg.train)
    if optim_state:
        optimizer.load_state_dict(optim_state)
    store.update_run(run.id, status="running", error="")

    try:
        cache = remote_cache(client, model.rungs, cfg.wire_dtype, store.root, codes)
        wanted = train_ex + valid_ex
        notify(Progress("features", 0, len(wanted)))
        passes = cache.ensure(wanted, progress=progress)
        notify(Progress("features", len(wanted), len(wanted), {"fetched": passes}))
        seconds["prepare"] = time.perf_counter() - t
        train_f, valid_f = cache.lazy(train_ex), cache.lazy(valid_ex)
        meta = dict(data_hash=_hash(examples), train=asdict(cfg.train))
        epochs: list[dict] = list(store.run(run.id).epochs)[:start_epoch]

        def on_epoch(epoch: int, opt, losses: dict) -> None:
            save_checkpoint(ckpt, model, describe(model, epoch=epoch, **meta), opt)
            epochs.append(losses)
            store.update_run(
                run.id,
                epochs_done=epoch,
                epochs=epochs,
                feature_passes=passes,
                checkpoint=str(ckpt.relative_to(store.root)),
            )
            notify(Progress("epoch", epoch, cfg.train.epochs, losses))

        t = time.perf_counter()
        if start_epoch < cfg.train.epochs:
            train(
                model,
                train_f,
                cfg.train,
                valid=valid_f,
                optimizer=optimizer,
                start_epoch=start_epoch,
                on_epoch=on_epoch,
                progress=progress,
            )
        seconds["train"] = time.perf_counter() - t

        calibration: dict = {}
        if model.setting in GATED_SETTINGS:
            t = time.perf_counter()
            calibration = calibrate_remote(
                model, client, valid_f or train_f, cfg, [e.prompt for e in valid_ex], notify
            )
            seconds["calibrate"] = time.perf_counter() - t
            meta["calibration"] = calibration
        save_checkpoint(ckpt, model, describe(model, epoch=cfg.train.epochs, **meta), optimizer)
        data = ckpt.read_bytes()
        store.update_run(
            run.id,
            status="finished",
            calibration=calibration,
            seconds=seconds,
            feature_passes=passes,
        )
        n = model.trainable_parameters()
        store.add_checkpoint(
            run.id,
            path=str(ckpt.relative_to(store.root)),
            setting=model.setting,
            epoch=cfg.train.epochs,
            threshold=calibration.get("threshold"),
            target_usage=calibration.get("target_usage"),
            usage=calibration.get("usage"),
            parameters=n,
            parameters_pct=100 * n / head.num_parameters,
            sha256=hashlib.sha256(data).hexdigest(),
            bytes=len(data),
        )
    except BaseException as exc:
        store.update_run(run.id, status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
        raise
    notify(Progress("done", 1, 1, {"run": run.id}))
    return store.run(run.id)


@torch.no_grad()
def calibrate_remote(
    model: SPAModel,
    client: CloudClient,
    valid: Sequence[Features],
    cfg: DeviceTrainConfig,
    prompts: Sequence[Sequence[int]],
    notify: Callable[[Progress], None],
) -> dict:
    """Threshold for the usage budget (see the module docstring); sets it on `model`."""
    target = cfg.train.target_usage
    forced = torch.cat([model.gate_prob(f.final.to(model.side_dtype)) for f in valid])
    threshold = threshold_for(forced, target)
    model.config = replace(model.config, threshold=threshold)
    usage = float((forced >= threshold).float().mean())
    prompts = list(prompts)[: cfg.calibration_prompts]
    seen: list[float] = []
    decode = DecodeConfig(max_new_tokens=cfg.calibration_tokens)
    for i, prompt in enumerate(prompts):
        notify(Progress("calibrate", i, len(prompts)))
        generation = RemoteGeneration(client, model, list(prompt), model.setting, decode)
        seen += [t.gate_prob for t in generation if t.gate_prob is not None]
    if seen:
        probs = torch.tensor(seen)
        threshold = threshold_for(probs, target)
        model.config = replace(model.config, threshold=threshold)
        usage = float((probs >= threshold).float().mean())
    notify(Progress("calibrate", len(prompts), len(prompts), {"threshold": threshold}))
    return {"target_usage": target, "threshold": threshold, "usage": usage, "tokens": len(seen)}


def start_model(
    store: Store, head: FrozenHead, cfg: DeviceTrainConfig, warm: bool, initial: dict
) -> SPAModel:
    """A new run's model: seeded, or the newest checkpoint of the setting; then `initial`."""
    latest = store.current_checkpoint(cfg.setting) if warm else None
    if latest is not None and read_checkpoint(store.path(latest.path))[0].vocab_size != (
        head.vocab_size
    ):
        latest = None  # trained on the other target (text or item codes): start afresh
    if latest is not None:
        model = load_checkpoint(store.path(latest.path), head)[0]
    else:
        torch.manual_seed(cfg.train.seed)
        side = SideConfig(
            hidden_size=head.hidden_size,
            num_layers=head.num_layers,
            rungs=cfg.rungs,
            reduction=cfg.reduction,
        )
        spa = SPAConfig(
            setting=cfg.setting, wire_dtype=cfg.wire_dtype, tap_encoding=cfg.tap_encoding
        )
        model = SPAModel(head, spa, side)
    params = model.trainable()
    unknown = sorted(set(initial) - set(params))
    if unknown:
        raise DeviceError(f"initial parameters {unknown[:3]} are not parameters of {cfg.setting}")
    with torch.no_grad():
        for name, value in initial.items():
            if value.shape != params[name].shape:
                raise DeviceError(
                    f"initial {name} has shape {tuple(value.shape)}, expected "
                    f"{tuple(params[name].shape)}"
                )
            params[name].copy_(value)
    return model


def _unfinished(store: Store) -> TrainingRun | None:
    runs = [r for r in store.runs() if r.status in ("running", "failed")]
    return runs[-1] if runs else None


def _split(examples: list[Example], fraction: float, seed: int) -> tuple[list, list]:
    """Seeded held-out split; fewer than 4 examples: all train, none held out."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_valid = round(fraction * len(examples)) if len(examples) >= 4 else 0
    n_valid = max(1, n_valid) if len(examples) >= 4 and fraction > 0 else n_valid
    valid = sorted(order[:n_valid])
    keep = set(valid)
    return [e for i, e in enumerate(examples) if i not in keep], [examples[i] for i in valid]


def _hash(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(repr((e.prompt, e.target)).encode())
    return h.hexdigest()[:16]
