"""The private side network `g` and the gate `σ` (the only learned parameters SPA adds).

`SideNetwork` is a ladder side network (Sung et al., 2022): each rung's tap is normalised,
projected down to the side width and mixed into the side stream (from the second rung on) by a
learned scalar ladder gate μ = sigmoid(α) (α = 0, so μ starts at 0.5); small causal
transformer blocks with their own KV cache process the stream; an up-projection back to H,
initialised to zero, makes an untrained side network a no-op (`f(x) + g(x) = f(x)`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from personalization.config import SideConfig


class SideCache:
    """Per-block keys and values of the side network, for incremental decoding."""

    def __init__(self, num_blocks: int):
        self.kv: list[tuple[Tensor, Tensor] | None] = [None] * num_blocks

    @property
    def length(self) -> int:
        return 0 if self.kv[0] is None else self.kv[0][0].shape[2]

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search reordering / expansion)."""
        self.kv = [None if e is None else (e[0][index], e[1][index]) for e in self.kv]


class SideBlock(nn.Module):
    """Pre-norm causal self-attention + MLP at the side width."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.RMSNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.mlp_norm = nn.RMSNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width, bias=False),
            nn.GELU(),
            nn.Linear(mlp_ratio * width, width, bias=False),
        )

    def forward(
        self, x: Tensor, past: tuple[Tensor, Tensor] | None, mask: Tensor | None = None
    ) -> tuple[Tensor, tuple]:
        """`mask` [B, 1, T, P + T] (True: attend) replaces the causal mask (e.g. a token tree)."""
        B, T, D = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(B, T, 3, self.heads, D // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, hd]
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if mask is None:
            P = k.shape[2] - T  # positions already cached
            mask = (
                torch.arange(P + T, device=x.device)[None, :]
                <= torch.arange(P, P + T, device=x.device)[:, None]
            )
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.out(y.transpose(1, 2).reshape(B, T, D))
        x = x + self.mlp(self.mlp_norm(x))
        return x, (k, v)


class SideNetwork(nn.Module):
    """`g`: taps at the rungs [B, T, R, H] → an H-vector per position [B, T, H]."""

    def __init__(self, config: SideConfig):
        super().__init__()
        self.config = config
        H, D, R = config.hidden_size, config.width, len(config.rungs)
        self.tap_norms = nn.ModuleList(nn.RMSNorm(H) for _ in range(R))
        self.downs = nn.ModuleList(nn.Linear(H, D, bias=False) for _ in range(R))
        self.ladder = nn.Parameter(torch.zeros(R - 1))  # μ_i = sigmoid(α_i) = 0.5 at start
        self.blocks = nn.ModuleList(SideBlock(D, config.heads, config.mlp_ratio) for _ in range(R))
        self.out_norm = nn.RMSNorm(D)
        self.up = nn.Linear(D, H, bias=False)
        nn.init.zeros_(self.up.weight)

    def new_cache(self) -> SideCache:
        return SideCache(len(self.blocks))

    def forward(
        self, taps: Tensor, cache: SideCache | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """g(x) for the new positions; with a cache, earlier positions are attended, not redone.
        `mask` (see `SideBlock`) lets speculative decoding score a whole token tree in one call."""
        if taps.shape[-2:] != (len(self.blocks), self.config.hidden_size):
            raise ValueError(
                f"taps have shape {tuple(taps.shape)}, expected [B, T, {len(self.blocks)}, "
                f"{self.config.hidden_size}] (R rungs × H)"
            )
        mix = torch.sigmoid(self.ladder)
        s = None
        for i, block in enumerate(self.blocks):
            z = self.downs[i](self.tap_norms[i](taps[:, :, i]))
            s = z if s is None else mix[i - 1] * z + (1 - mix[i - 1]) * s
            s, kv = block(s, None if cache is None else cache.kv[i], mask)
            if cache is not None:
                cache.kv[i] = kv
        return self.up(self.out_norm(s))


class Gate(nn.Module):
    """`σ`: a linear H×2 classifier on the backbone's final (normed) hidden state.

    It reads the normed state — what the LM head sees — because the raw residual stream's scale
    varies by orders of magnitude across positions. It starts closed, p(device) = 0.1 everywhere,
    so an untrained device is never asked: like the zero-initialised side network, an untrained
    plug-in changes nothing.
    """

    INITIAL_P_DEVICE = 0.1

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 2)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        with torch.no_grad():
            p = self.INITIAL_P_DEVICE
            self.linear.bias[1] = math.log(p / (1 - p))

    def forward(self, normed_hidden: Tensor) -> Tensor:
        """Probability of the `device` branch, per position."""
        return torch.softmax(self.linear(normed_hidden), dim=-1)[..., 1]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
