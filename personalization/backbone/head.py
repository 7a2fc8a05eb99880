"""The backbone's frozen final norm and LM head, without its layers — all a device needs.

Training `g` (through `head(f + g)`) and the gate (on `final_norm(f)`) from cached features touches
nothing of the backbone but these two modules, so a device that fetched them from the cloud can
build an `SPAModel` on a `FrozenHead` and train with `personalization.training.train`, never
holding the backbone's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from personalization.errors import ConfigError

if TYPE_CHECKING:  # annotations only
    from personalization.codecs import Basis


class RMSNorm(nn.Module):
    """x / rms(x) · w, computed in float32 like Llama's (torch's RMSNorm rounds differently)."""

    def __init__(self, weight: Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


@dataclass(frozen=True)
class BackboneFacts:
    """What the cloud says about its backbone (GET /v1/info)."""

    name: str
    fingerprint: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_parameters: int
    eos_token_ids: frozenset[int]


class FrozenHead:
    """Stands in for `Backbone` wherever only `head()`, `final_norm` and its facts are used —
    and, with the cloud's public `basis` of the backbone's taps, wherever taps are encoded."""

    def __init__(
        self,
        facts: BackboneFacts,
        tensors: dict[str, Tensor],
        norm: str,
        eps: float,
        basis: Basis | None = None,
        offset: int = 0,
    ):
        """`offset` > 0: the head's rows are item codes after that many text ids (a coded
        backbone's head), and every text id gets −inf."""
        self.facts, self.basis, self.offset = facts, basis, offset
        weight = tensors["final_norm.weight"].float()
        if "final_norm.bias" in tensors:  # LayerNorm (GPT-2 family)
            self.final_norm: nn.Module = nn.LayerNorm(weight.shape[0], eps=eps)
            self.final_norm.load_state_dict({"weight": weight, "bias": tensors["final_norm.bias"]})
        elif "rms" in norm.lower():
            self.final_norm = RMSNorm(weight, eps)
        else:
            raise ConfigError(f"cannot rebuild a final norm of type {norm!r} from its weights")
        head = tensors["lm_head.weight"].float()  # the vocabulary × H matrix: never copied
        bias = "lm_head.bias" in tensors
        self.lm_head = nn.utils.skip_init(nn.Linear, head.shape[1], head.shape[0], bias=bias)
        self.lm_head.weight = nn.Parameter(head, requires_grad=False)
        if bias:
            self.lm_head.bias = nn.Parameter(tensors["lm_head.bias"].float(), requires_grad=False)
        for module in (self.final_norm, self.lm_head):
            module.eval().requires_grad_(False)
        if head.shape != (facts.vocab_size - offset, facts.hidden_size):
            raise ConfigError(
                f"the head has shape {tuple(head.shape)}, the backbone reports "
                f"vocab {facts.vocab_size} (rows after {offset}) × H {facts.hidden_size}"
            )

    def __getattr__(self, name: str):  # name, fingerprint, num_layers, hidden_size, ...
        return getattr(self.__dict__["facts"], name)

    def head(self, hidden: Tensor) -> Tensor:
        """Logits from a pre-norm hidden state, as `Backbone.head`."""
        logits = self.lm_head(self.final_norm(hidden))
        return F.pad(logits, (self.offset, 0), value=float("-inf")) if self.offset else logits
