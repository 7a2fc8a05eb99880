"""What the frozen backbone says about each training example, computed once and cached.

Because the backbone is frozen, everything SPA's training needs from it is a fixed function of the
example: the taps at the side network's rungs for every position, and — only at the positions that
predict the target — the final hidden state `f(x)` and the backbone's own log-probability of the
target token (the baseline the gate's labels compare against). `FeatureCache` stores one
safetensors file per example (fp16 taps and hidden states) under a directory keyed by the
backbone's weights, the rung set and the tap precision; files are named by the example's content,
so later epochs and later runs — and overlapping datasets — never rerun the backbone.

The features can come from an in-process backbone (`BackboneFeatures`) or from anything else with
the same `source_id` / `__call__` shape — a device fetching them from the cloud's features endpoint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from personalization.backbone.embedded import cache_dir
from personalization.files import atomic_path
from personalization.training.data import Example

if TYPE_CHECKING:  # annotations only: importing this module stays light
    from personalization.backbone.frozen import Backbone


@dataclass
class Features:
    """Backbone signals for one example (T = prompt + target − 1 input positions, Tt targets)."""

    taps: Tensor  # [T, R, H] at the rungs, wire precision
    final: Tensor  # [Tt, H] f(x) at the positions that predict the target
    base_logprob: Tensor  # [Tt] float32: log p_backbone(target token)
    labels: Tensor  # [Tt] int64: the target tokens

    @property
    def start(self) -> int:
        """Index of the first input position whose next token is a target token."""
        return self.taps.shape[0] - self.labels.shape[0]

    def to_dict(self) -> dict[str, Tensor]:
        return {
            "taps": self.taps,
            "final": self.final,
            "base_logprob": self.base_logprob,
            "labels": self.labels,
        }


class FeatureSource:
    """Computes `Features` for examples; `source_id` names what they depend on."""

    source_id: str

    def __call__(self, examples: Sequence[Example]) -> list[Features]:
        raise NotImplementedError


class BackboneFeatures(FeatureSource):
    """Features from a backbone held in this process (one forward pass per example)."""

    def __init__(self, backbone: Backbone, rungs: Sequence[int], dtype: str = "float16"):
        self.backbone, self.rungs, self.dtype = backbone, tuple(rungs), getattr(torch, dtype)
        self.source_id = source_id(backbone.fingerprint, self.rungs, dtype)

    def __call__(self, examples: Sequence[Example]) -> list[Features]:
        return [backbone_features(self.backbone, e, self.rungs, self.dtype) for e in examples]


def source_id(fingerprint: str, rungs: Sequence[int], dtype: str) -> str:
    key = f"{fingerprint}|{','.join(map(str, rungs))}|{dtype}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def backbone_features(
    backbone: Backbone, example: Example, rungs: Sequence[int], dtype: torch.dtype
) -> Features:
    """One backbone pass; the LM head runs on the target positions only."""
    ids = torch.tensor([example.ids[:-1]])
    out = backbone(ids, rungs=rungs, logits=None)
    n = len(example.target)
    final = out.hidden[0, -n:]
    labels = torch.tensor(example.target)
    with torch.inference_mode():
        logprobs = torch.log_softmax(backbone.head(final).float(), dim=-1)
    base = logprobs.gather(-1, labels[:, None])[:, 0]
    return Features(out.taps[0].to(dtype), final.to(dtype), base.float(), labels)


class FeatureCache:
    """Content-addressed files: `<root>/features/<source id>/<key[:2]>/<key>.safetensors`."""

    def __init__(self, source: FeatureSource, root: str | Path | None = None):
        self.source = source
        self.dir = Path(root or cache_dir()) / "features" / source.source_id
        self.computed = 0  # examples this cache had to send through the source

    def path(self, example: Example) -> Path:
        key = example.key
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, example: Example) -> Features | None:
        path = self.path(example)
        if not path.is_file():
            return None
        return Features(**load_file(path))

    def put(self, example: Example, features: Features) -> None:
        """Write atomically: a crash leaves the old file or none, never half of one."""
        with atomic_path(self.path(example)) as tmp:
            save_file({k: v.contiguous() for k, v in features.to_dict().items()}, tmp)

    def ensure(self, examples: Sequence[Example], *, batch: int = 8, progress: bool = True) -> int:
        """Compute and store every missing example; returns how many were computed."""
        missing = list({e.key: e for e in examples if not self.path(e).is_file()}.values())
        bar = tqdm(total=len(missing), desc="backbone features", unit="ex", disable=not progress)
        for i in range(0, len(missing), batch):
            chunk = missing[i : i + batch]
            for example, features in zip(chunk, self.source(chunk), strict=True):
                self.put(example, features)
            bar.update(len(chunk))
        bar.close()
        self.computed += len(missing)
        return len(missing)

    def lazy(self, examples: Sequence[Example]) -> LazyFeatures:
        """The examples' features, read from disk when indexed (bounded memory); call
        `ensure` first."""
        return LazyFeatures(self, list(examples))

    def load(self, examples: Sequence[Example]) -> list[Features]:
        """Features for every example (computing what is missing first)."""
        self.ensure(examples)
        loaded = [self.get(e) for e in examples]
        return [f for f in loaded if f is not None]


class LazyFeatures(Sequence):
    """A sequence of cached features, each read from its file when indexed."""

    def __init__(self, cache: FeatureCache, examples: list[Example]):
        self.cache, self.examples = cache, examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        features = self.cache.get(self.examples[i])
        if features is None:
            raise KeyError(f"example {i} is not in the feature cache (call ensure first)")
        return features


def make_cache(
    backbone: Backbone, rungs: Sequence[int], dtype: str = "float16", root: str | Path | None = None
) -> FeatureCache:
    return FeatureCache(BackboneFeatures(backbone, rungs, dtype), root)
