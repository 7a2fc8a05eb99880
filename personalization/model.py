"""SPA: the frozen backbone `f`, the side network `g` and the gate `σ`, combined by setting.

| setting | logits                         | device asked |
|---------|--------------------------------|--------------|
| base    | head(f)                        | never        |
| lst     | head(g)                        | every token  |
| full    | head(f + g)                    | every token  |
| choice  | head(g) if σ else head(f)      | when σ = 1   |
| spa     | head(f + σ·g)                  | when σ = 1   |
| lora / adapter | the adapted backbone's own logits | L / 2L times per token |

`Stepper` runs this incrementally with KV caches for both networks. When the gate asks the device
after cloud-only tokens, the side network first catches up on the skipped positions' taps in one
batch — exactly the message a remote device would receive.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from personalization.baselines import CONTACTS_PER_LAYER, adapter_backbone, lora_backbone
from personalization.codecs import Basis, TapCodec, basis_for, make_codec, rank_of
from personalization.config import GATED_SETTINGS, SIDE_SETTINGS, SideConfig, SPAConfig
from personalization.errors import ConfigError
from personalization.latency import Books
from personalization.side import Gate, SideNetwork

if TYPE_CHECKING:  # annotations only: importing this module stays light
    from personalization.backbone.frozen import Backbone


class SPAModel(nn.Module):
    """The whole SPA model; only `side`, `gate` (and a baseline's adapters) are trainable."""

    def __init__(
        self, backbone: Backbone, config: SPAConfig | None = None, side: SideConfig | None = None
    ):
        super().__init__()
        self.config = config or SPAConfig()
        self.backbone = backbone  # a plain object: frozen, shared, never part of our state dict
        self.side = SideNetwork(
            side or SideConfig(hidden_size=backbone.hidden_size, num_layers=backbone.num_layers)
        )
        self.gate = Gate(backbone.hidden_size)
        self.adapted: Backbone | None = None
        if self.config.setting == "lora":
            self.adapted = lora_backbone(backbone, self.config.adapter_rank)
        elif self.config.setting == "adapter":
            self.adapted = adapter_backbone(backbone, self.config.adapter_rank)
        if self.adapted is not None:  # registered, so its adapters are among our parameters
            self.baseline = self.adapted.model
        self._basis: Basis | None = None
        self._codec: TapCodec | None = None

    @property
    def setting(self) -> str:
        return self.config.setting

    @property
    def rungs(self) -> tuple[int, ...]:
        return self.side.config.rungs

    @property
    def wire_dtype(self) -> torch.dtype:
        return getattr(torch, self.config.wire_dtype)

    @property
    def wire_bytes(self) -> int:
        """Bytes per value on the wire."""
        return torch.finfo(self.wire_dtype).bits // 8

    def wire(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """What survives a trip over the wire: rounded to the wire dtype, then cast to `dtype`
        (default: back to x's own) for the receiver to compute on."""
        return x.to(self.wire_dtype).to(dtype or x.dtype)

    @property
    def basis(self) -> Basis:
        """The public low-rank basis of the backbone's taps (codecs.fit_basis); a device holds no
        backbone, so its FrozenHead carries the cloud's (GET /v1/codec/{name})."""
        if self._basis is None:
            self._basis = getattr(self.backbone, "basis", None) or basis_for(self.backbone)
        return self._basis

    @property
    def codec(self) -> TapCodec:
        """How this model's taps cross the wire (SPAConfig.tap_encoding, at its rungs)."""
        if self._codec is None or self._codec.name != self.config.tap_encoding:
            name = self.config.tap_encoding
            self._codec = (
                make_codec(name, dtype=self.wire_dtype)
                if rank_of(name) is None
                else make_codec(name, basis=self.basis.select(self.rungs))
            )
        return self._codec

    def wire_taps(self, taps: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Taps as the side network receives them: the codec's round trip, in `dtype`."""
        return self.codec.roundtrip(taps).to(dtype or taps.dtype)

    @property
    def tap_bytes(self) -> int:
        """Bytes one tap position costs on the wire."""
        return self.codec.bytes_per_position(len(self.rungs), self.backbone.hidden_size)

    @property
    def side_dtype(self) -> torch.dtype:
        return self.side.up.weight.dtype

    def gate_prob(self, f: Tensor) -> Tensor:
        """p(device) from the backbone's final hidden state f(x)."""
        return self.gate(self.backbone.final_norm(f).to(self.side_dtype))

    def trainable(self) -> dict[str, nn.Parameter]:
        """The parameters this setting trains (and a checkpoint stores), by state-dict name."""
        if self.adapted is not None:
            named = self.named_parameters()
            return {n: p for n, p in named if p.requires_grad and n.startswith("baseline.")}
        parts = ("side", "gate") if self.setting in GATED_SETTINGS else ("side",)
        if self.setting not in SIDE_SETTINGS:
            return {}
        return {n: p for n, p in self.named_parameters() if n.split(".")[0] in parts}

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable().values())

    def parameter_report(self) -> str:
        n = self.trainable_parameters()
        return (
            f"setting {self.setting}: {n:,} trainable parameters = "
            f"{100 * n / self.backbone.num_parameters:.3f} % of the backbone's "
            f"{self.backbone.num_parameters:,} (rungs {list(self.rungs)}, side width "
            f"{self.side.config.width})"
        )

    def sigma(self, p_device: Tensor | None, like: Tensor) -> Tensor:
        """σ per position: the gate's decision, or fixed by the setting."""
        if self.setting in GATED_SETTINGS:
            return p_device >= self.config.threshold
        return torch.full(like.shape[:-1], self.setting in ("lst", "full"), dtype=torch.bool)

    def combine(self, f: Tensor, g: Tensor | None, sigma: Tensor) -> Tensor:
        """Logits of the setting from f(x), g(x) (None where the device was not asked) and σ."""
        head = self.backbone.head
        if g is None or self.setting == "base":
            return head(f)
        s = sigma[..., None]
        if self.setting == "lst":
            return head(g)
        if self.setting == "full":
            return head(f + g)
        if self.setting == "spa":
            return head(f + s * g)
        if self.setting == "choice":
            return head(torch.where(s, g, f))
        raise ConfigError(f"setting {self.setting} has no side combination")


@dataclass
class Step:
    """One incremental step's result for the last position of each row."""

    logits: Tensor  # [B, V]
    device: Tensor  # [B] bool: the device's g(x) shaped this token
    p_device: Tensor | None  # [B] gate probabilities (gated settings)
    fallback: bool = False  # the device was asked but missed its deadline: the token is f's own


@dataclass(frozen=True)
class Ask:
    """What a device round trip carries to the device: everything it needs to answer g(x) for
    the last position of each of the B rows."""

    taps: Tensor  # [B, t, R, H] wire-rounded taps of every position the device has not seen
    shared: int = 0  # leading positions identical in every row (a beam search's prompt): sent once
    reorder: Tensor | None = None  # [B] rows of the device's cache the current rows continue
    # (beam search reorders rows between contacts; None: unchanged)


#: A device reached some other way (over HTTP): an `Ask` → g(x) [B, H] for the last position, or
#: None when it missed its deadline.
Device = Callable[[Ask], Tensor | None]


class Stepper:
    """Incremental SPA decoding state: backbone cache, side cache, taps not yet sent, books.

    `device` replaces the in-process side network (a cloud session asks a remote one); by default
    `model.side` runs here on its own cache, exactly as a remote device would.
    """

    def __init__(
        self,
        model: SPAModel,
        device: Device | None = None,
        stream: Callable[[Tensor], None] | None = None,
    ):
        self.model = model
        self.device = device or self._side_network
        # streamed taps: every new position's wire taps go to `stream` as soon as they exist,
        # and a device round trip then carries none (greedy and sampling: one row)
        self.stream = stream
        self.backbone = model.adapted or model.backbone
        self.cache = self.backbone.new_cache()
        self.side_cache = model.side.new_cache()
        # wire-rounded taps the device has not seen, [B, t, R, H]; a chunk with B = 1 is shared by
        # every row (a beam search's prompt) and crosses the wire once
        self.pending: list[Tensor] = []
        self.reordered: Tensor | None = None  # beam reorders since the device's last answer
        self.books = Books()

    @torch.no_grad()
    def step(self, input_ids: Tensor) -> Step:
        """Feed new positions [B, T] (a prompt, or one token per row) and get the next logits."""
        model, books = self.model, self.books
        B, T = input_ids.shape
        books.steps += 1
        start = time.perf_counter()
        if model.setting not in SIDE_SETTINGS:
            out = self.backbone(input_ids, cache=self.cache, logits="last")
            books.t_cloud += time.perf_counter() - start
            device = torch.full((B,), model.adapted is not None)
            if model.adapted is not None:
                self._account_layer_contacts(B * T)
            return Step(out.logits[:, -1], device, None)
        out = self.backbone(input_ids, cache=self.cache, rungs=model.rungs, logits=None)
        f = out.hidden[:, -1:]
        taps = model.wire_taps(out.taps, model.side_dtype)
        if self.stream is None:
            self.pending.append(taps)
        else:
            self.stream(taps)
            books.tap_positions += B * T
            books.bytes_to_device += B * T * model.tap_bytes
        p = None
        if model.setting in GATED_SETTINGS:
            p = model.gate_prob(f)[:, 0]
        sigma = model.sigma(p, f[:, 0])
        books.t_cloud += time.perf_counter() - start
        g = None
        if bool(sigma.any()):
            g = self._ask_device(B)
            if g is None:  # the device missed its deadline: f's own token, marked fallback
                start = time.perf_counter()
                logits = model.backbone.head(f[:, 0])
                books.t_cloud += time.perf_counter() - start
                return Step(logits, sigma, p, fallback=True)
            g = g.to(f.dtype)
        start = time.perf_counter()
        logits = model.combine(f[:, 0], g, sigma)
        books.t_cloud += time.perf_counter() - start
        return Step(logits, sigma, p)

    def _side_network(self, ask: Ask) -> Tensor:
        """The in-process device: g(x) of the last position, rounded as if it crossed the wire."""
        if ask.reorder is not None:
            self.side_cache.reorder(ask.reorder)
        return self.model.wire(self.model.side(ask.taps, self.side_cache)[:, -1])

    def _ask_device(self, rows: int) -> Tensor | None:
        """One device round trip: send every pending tap position, get g(x) for the last one.

        When the device does not answer (None), the taps stay pending, so the next round trip
        still carries every position the device has not seen.
        """
        model, books = self.model, self.books
        positions = sum(t.shape[0] * t.shape[1] for t in self.pending)
        R, H = len(model.rungs), model.backbone.hidden_size
        taps = torch.cat(
            [torch.zeros(rows, 0, R, H)] + [t.expand(rows, -1, -1, -1) for t in self.pending], dim=1
        )
        shared = 0
        for chunk in self.pending:
            if chunk.shape[0] != 1 or rows == 1:
                break
            shared += chunk.shape[1]
        start = time.perf_counter()
        g = self.device(Ask(taps, shared if rows > 1 else 0, self.reordered))
        books.t_device += time.perf_counter() - start
        if g is None:
            return None
        self.pending, self.reordered = [], None
        books.contacts += 1
        books.tap_positions += positions
        books.bytes_to_device += positions * model.tap_bytes
        books.bytes_from_device += rows * H * model.wire_bytes
        return g

    def _account_layer_contacts(self, positions: int) -> None:
        """lora/adapter: each layer's adapter lives on the device: k round trips per layer, each
        carrying the layer's hidden states there and the adapter's output back."""
        k = CONTACTS_PER_LAYER[self.model.setting] * self.backbone.num_layers
        payload = positions * self.backbone.hidden_size * self.model.wire_bytes
        self.books.contacts += k
        self.books.bytes_to_device += k * payload
        self.books.bytes_from_device += k * payload

    def reorder(self, index: Tensor) -> None:
        """Select / repeat batch rows (beam search); shared (B = 1) pending taps stay shared. The
        device learns the composed reorder with its next `Ask` and applies it to its own cache."""
        self.cache.reorder_cache(index)
        self.reordered = index if self.reordered is None else self.reordered[index]
        self.pending = [t if t.shape[0] == 1 else t[index] for t in self.pending]
