"""Typed configs: which SPA setting, the side network's shape, and how to decode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Setting = Literal["base", "lst", "full", "choice", "spa", "lora", "adapter"]
SETTINGS: tuple[str, ...] = ("base", "lst", "full", "choice", "spa", "lora", "adapter")
#: settings whose token comes from the backbone plus a side network on the device
SIDE_SETTINGS = ("lst", "full", "choice", "spa")
#: settings where the gate decides, token by token, whether the device is asked
GATED_SETTINGS = ("choice", "spa")


def default_rungs(num_layers: int) -> tuple[int, ...]:
    """About a quarter of the layers, evenly spaced and ending at the last one."""
    n = max(1, round(num_layers / 4))
    return tuple(sorted({max(1, round(num_layers * (i + 1) / n)) for i in range(n)}))


@dataclass(frozen=True)
class SideConfig:
    """Shape of the ladder side network `g` (Ladder Side-Tuning, width H/r)."""

    hidden_size: int  # H of the backbone
    num_layers: int  # L of the backbone
    rungs: tuple[int, ...] = ()  # backbone layers tapped; () = default_rungs(L)
    reduction: int = 8  # r: side width = H / r
    heads: int = 0  # attention heads of the side blocks; 0 = width // 32 (at least 1)
    mlp_ratio: int = 2

    def __post_init__(self):
        if not self.rungs:
            object.__setattr__(self, "rungs", default_rungs(self.num_layers))
        object.__setattr__(self, "rungs", tuple(int(k) for k in self.rungs))
        if any(not 1 <= k <= self.num_layers for k in self.rungs):
            raise ValueError(f"rungs {self.rungs} must lie in 1..{self.num_layers}")
        if list(self.rungs) != sorted(set(self.rungs)):
            raise ValueError(f"rungs {self.rungs} must be strictly increasing")
        if self.reduction < 1 or self.hidden_size % self.reduction:
            raise ValueError(f"reduction {self.reduction} must divide H = {self.hidden_size}")
        if not self.heads:
            object.__setattr__(self, "heads", max(1, self.width // 32))
        if self.width % self.heads:
            raise ValueError(f"{self.heads} heads do not divide the side width {self.width}")

    @property
    def width(self) -> int:
        return self.hidden_size // self.reduction


@dataclass(frozen=True)
class SPAConfig:
    """Which setting produces the tokens, and how the device is consulted."""

    setting: Setting = "spa"
    threshold: float = 0.5  # σ = 1 when the gate's device probability ≥ threshold
    wire_dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # taps and g(x) in transit
    adapter_rank: int = 8  # r of the `lora` baseline / bottleneck width divisor of `adapter`

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise ValueError(
                f"unknown setting {self.setting!r}; choose one of {', '.join(SETTINGS)}"
            )


@dataclass(frozen=True)
class DecodeConfig:
    """Greedy, sampling or beam search, as in transformers' `generate`."""

    strategy: Literal["greedy", "sample", "beam"] = "greedy"
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool = False

    def __post_init__(self):
        if self.strategy not in ("greedy", "sample", "beam"):
            raise ValueError(f"unknown strategy {self.strategy!r}: greedy, sample or beam")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be ≥ 1")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be > 0 and top_p in (0, 1]")
        if self.num_beams < 1:
            raise ValueError("num_beams must be ≥ 1")
