"""Checkpoints: the trained parameters of one setting (+ optimizer state), as one safetensors file.

The file's metadata says what the parameters belong to — backbone name and weight fingerprint,
L, H, vocabulary, the side network's shape, the setting, the calibrated gate threshold, a hash of
the training data — so loading onto another backbone or shape fails with a message instead of
a shape error or, worse, silently wrong output. Writes go to a temporary file that replaces the
target only once complete: a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from personalization.config import SideConfig, SPAConfig
from personalization.errors import SpaError
from personalization.files import atomic_path, read_safetensors
from personalization.model import SPAModel

if TYPE_CHECKING:  # annotations only: importing this module stays light
    from personalization.backbone.frozen import Backbone

FORMAT = "spa-checkpoint/1"
_OPTIM = "optim."


class CheckpointError(SpaError, ValueError):
    """A checkpoint that is missing, damaged, or made for another backbone or shape."""


@dataclass
class CheckpointInfo:
    """Everything a checkpoint says about itself besides its tensors."""

    spa: SPAConfig
    side: SideConfig
    backbone: str
    fingerprint: str
    vocab_size: int
    epoch: int = 0
    data_hash: str = ""
    train: dict = field(default_factory=dict)  # the training config, for the record
    calibration: dict = field(default_factory=dict)  # target usage, threshold, measured usage

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "spa": json.dumps(asdict(self.spa)),
            "side": json.dumps(asdict(self.side)),
            "backbone": self.backbone,
            "fingerprint": self.fingerprint,
            "vocab_size": str(self.vocab_size),
            "epoch": str(self.epoch),
            "data_hash": self.data_hash,
            "train": json.dumps(self.train),
            "calibration": json.dumps(self.calibration),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> CheckpointInfo:
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"not an SPA checkpoint (format {meta.get('format')!r})")
        side = json.loads(meta["side"])
        side["rungs"] = tuple(side["rungs"])
        return cls(
            spa=SPAConfig(**json.loads(meta["spa"])),
            side=SideConfig(**side),
            backbone=meta["backbone"],
            fingerprint=meta["fingerprint"],
            vocab_size=int(meta["vocab_size"]),
            epoch=int(meta["epoch"]),
            data_hash=meta["data_hash"],
            train=json.loads(meta["train"]),
            calibration=json.loads(meta["calibration"]),
        )


def describe(model: SPAModel, **kwargs) -> CheckpointInfo:
    b = model.backbone
    return CheckpointInfo(
        model.config, model.side.config, b.name, b.fingerprint, b.vocab_size, **kwargs
    )


def save_checkpoint(
    path: str | Path,
    model: SPAModel,
    info: CheckpointInfo,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Atomically write the setting's trainable parameters (and optimizer state) to `path`."""
    path = Path(path)
    tensors = {n: p.detach().contiguous() for n, p in model.trainable().items()}
    if not tensors:
        raise CheckpointError(f"setting {model.setting!r} has nothing to save")
    meta = info.metadata()
    if optimizer is not None:
        state = optimizer.state_dict()
        for index, entries in state["state"].items():
            for key, value in entries.items():
                tensors[f"{_OPTIM}{index}.{key}"] = torch.as_tensor(value).contiguous()
        meta["optimizer"] = json.dumps(state["param_groups"])
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


def read_checkpoint(path: str | Path) -> tuple[CheckpointInfo, dict[str, torch.Tensor], dict]:
    """Info, parameters and (possibly empty) optimizer state of a checkpoint file."""
    meta, tensors = read_safetensors(path, CheckpointError, "checkpoint")
    try:
        info = CheckpointInfo.from_metadata(meta)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: damaged checkpoint metadata ({exc})") from None
    params = {k: v for k, v in tensors.items() if not k.startswith(_OPTIM)}
    optim: dict = {}
    if "optimizer" in meta:
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith(_OPTIM):
                index, key = k[len(_OPTIM) :].split(".", 1)
                state.setdefault(int(index), {})[key] = v
        groups = [  # JSON turned tuples (AdamW's betas) into lists
            {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
            for g in json.loads(meta["optimizer"])
        ]
        optim = {"state": state, "param_groups": groups}
    return info, params, optim


def load_checkpoint(path: str | Path, backbone: Backbone) -> tuple[SPAModel, CheckpointInfo, dict]:
    """Rebuild the trained model on `backbone`; refuses a checkpoint made for another one."""
    info, params, optim = read_checkpoint(path)
    mine = (backbone.num_layers, backbone.hidden_size, backbone.vocab_size)
    theirs = (info.side.num_layers, info.side.hidden_size, info.vocab_size)
    if mine != theirs or info.fingerprint != backbone.fingerprint:
        raise CheckpointError(
            f"{path} was trained on backbone {info.backbone!r} (L={theirs[0]}, H={theirs[1]}, "
            f"vocab={theirs[2]}, weights {info.fingerprint}); this backbone is "
            f"{backbone.name!r} (L={mine[0]}, H={mine[1]}, vocab={mine[2]}, weights "
            f"{backbone.fingerprint})"
        )
    model = SPAModel(backbone, info.spa, info.side)
    expected = model.trainable()
    if set(params) != set(expected):
        raise CheckpointError(
            f"{path}: parameters do not match setting {info.spa.setting!r} "
            f"({len(set(params) ^ set(expected))} names differ)"
        )
    for name, p in expected.items():
        if params[name].shape != p.shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(params[name].shape)}, the model expects "
                f"{tuple(p.shape)}"
            )
        with torch.no_grad():
            p.copy_(params[name])
    return model, info, optim
