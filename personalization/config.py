"""Typed configs and the project's vocabulary: settings, decoding strategies, wire dtypes.

Each name list is defined here once; the cloud API, the device, the CLI and the UI derive theirs
from these (`typing.get_args` of the Literal types).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from personalization.errors import ConfigError

Setting = Literal["base", "lst", "full", "choice", "spa", "lora", "adapter"]
SETTINGS: tuple[str, ...] = get_args(Setting)
#: settings whose token comes from the backbone plus a side network on the device
SIDE_SETTINGS = ("lst", "full", "choice", "spa")
#: settings where the gate decides, token by token, whether the device is asked
GATED_SETTINGS = ("choice", "spa")
#: settings a remote session serves: lora / adapter live inside the backbone's layers (L or 2L
#: round trips per token), so they stay in-process baselines whose cost is computed, not measured
ServedSetting = Literal["base", "lst", "full", "choice", "spa"]
SERVED_SETTINGS: tuple[str, ...] = get_args(ServedSetting)
#: decoding strategies of `DecodeConfig` (in-process and over HTTP)
Strategy = Literal["greedy", "sample", "beam"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
#: precisions of taps, g(x) and features in transit
WireDtype = Literal["float16", "bfloat16", "float32"]
WIRE_DTYPES: tuple[str, ...] = get_args(WireDtype)
#: precisions the backbone computes in (`--dtype`); what crosses the wire is `WireDtype`
ComputeDtype = Literal["float32", "bfloat16", "float16"]
#: how taps are encoded on the wire (personalization.codecs): raw values of the wire dtype, int8
#: with a scale, or K coefficients on a public low-rank basis, int8
TapEncoding = Literal["raw-le", "int8", "lowrank64-int8", "lowrank32-int8"]
TAP_ENCODINGS: tuple[str, ...] = get_args(TapEncoding)
#: the measured best (benchmarks/wire.py): 272 B per tap position for SmolLM2, 34× less than
#: fp16, with Rouge-L within 0.5 of fp16 on XSum and PersonaChat
DEFAULT_TAP_ENCODING: TapEncoding = "lowrank32-int8"
#: when taps travel: `pull` — a side request carries every position the device has not seen;
#: `streamed` — the cloud pushes each position's taps as they exist, a side request only asks;
#: `run-ahead` — streamed taps with each drafted token, and the device corrects (run_ahead.py)
TapMode = Literal["pull", "streamed", "run-ahead"]
TAP_MODES: tuple[str, ...] = get_args(TapMode)
#: how speculative beam search (AtSpeed) verifies a draft: exact top-K, or relaxed sampling
Verify = Literal["strict", "relaxed"]
SPECULATIVE_STRATEGIES: tuple[str, ...] = tuple(f"speculative-{v}" for v in get_args(Verify))
#: next-item recommendation: beam search, or speculative beam search
RECOMMEND_STRATEGIES: tuple[str, ...] = ("beam", *SPECULATIVE_STRATEGIES)
#: what a federated device shares with the server: metrics only, its whole plug-in, or the
#: side network's body (gate and head stay personal)
FederatedStrategy = Literal["local", "fedavg", "fedper", "fedavg-ft"]
FEDERATED_STRATEGIES: tuple[str, ...] = get_args(FederatedStrategy)


def default_rungs(num_layers: int) -> tuple[int, ...]:
    """About a quarter of the layers, evenly spaced and ending at the last one."""
    n = max(1, round(num_layers / 4))
    return tuple(sorted({max(1, round(num_layers * (i + 1) / n)) for i in range(n)}))


@dataclass(frozen=True, kw_only=True)
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
            raise ConfigError(f"rungs {self.rungs} must lie in 1..{self.num_layers}")
        if list(self.rungs) != sorted(set(self.rungs)):
            raise ConfigError(f"rungs {self.rungs} must be strictly increasing")
        if self.reduction < 1 or self.hidden_size % self.reduction:
            raise ConfigError(f"reduction {self.reduction} must divide H = {self.hidden_size}")
        if not self.heads:
            object.__setattr__(self, "heads", max(1, self.width // 32))
        if self.width % self.heads:
            raise ConfigError(f"{self.heads} heads do not divide the side width {self.width}")

    @property
    def width(self) -> int:
        return self.hidden_size // self.reduction


@dataclass(frozen=True, kw_only=True)
class SPAConfig:
    """Which setting produces the tokens, and how the device is consulted."""

    setting: Setting = "spa"
    threshold: float = 0.5  # σ = 1 when the gate's device probability ≥ threshold
    wire_dtype: WireDtype = "float16"  # taps (raw-le) and g(x) in transit
    tap_encoding: TapEncoding = DEFAULT_TAP_ENCODING  # how taps cross the wire (codecs)
    adapter_rank: int = 8  # r of the `lora` baseline / bottleneck width divisor of `adapter`

    def __post_init__(self):
        if self.wire_dtype not in WIRE_DTYPES:
            raise ConfigError(
                f"unknown wire dtype {self.wire_dtype!r}; choose one of {', '.join(WIRE_DTYPES)}"
            )
        if self.tap_encoding not in TAP_ENCODINGS:
            raise ConfigError(
                f"unknown tap encoding {self.tap_encoding!r}; "
                f"choose one of {', '.join(TAP_ENCODINGS)}"
            )
        if self.setting not in SETTINGS:
            raise ConfigError(
                f"unknown setting {self.setting!r}; choose one of {', '.join(SETTINGS)}"
            )


@dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """Greedy, sampling or beam search, as in transformers' `generate`; the repetition
    controls are transformers' own logits processors (`decoding.logits_processors`)."""

    strategy: Strategy = "greedy"
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool = False
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this size occurs twice

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}"
            )
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be ≥ 1")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError("temperature must be > 0 and top_p in (0, 1]")
        if self.num_beams < 1:
            raise ConfigError("num_beams must be ≥ 1")
        if self.repetition_penalty <= 0 or self.no_repeat_ngram_size < 0:
            raise ConfigError("repetition_penalty must be > 0 and no_repeat_ngram_size ≥ 0")
