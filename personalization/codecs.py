"""Tap encodings: how taps cross the wire, and exactly what the side network sees after they did.

A tap position carries R rungs of H values: 9,216 bytes as raw fp16 for SmolLM2 (R = 8, H = 576).
Each encoding maps taps [..., R, H] to bytes and back; `roundtrip` is decode(encode(x)) without
the bytes, and in-process decoding and training apply it too, so a side network never sees at
inference inputs it was not trained on (whatever the path: in-process, remote pull, training).

* `raw-le` — raw little-endian values of the wire dtype: R·H·2 bytes in fp16 (the reference).
* `int8` — per position and rung, int8 values and an fp16 absmax scale: R·(H + 2) bytes.
* `lowrank<K>-int8` — per rung, the centred tap projected onto a public K-dimensional basis (the
  top principal directions of the backbone's own taps on public text), the K coefficients int8
  with an fp16 scale: R·(K + 2) bytes (K = 64: 528 B for SmolLM2, 17× less than fp16). The basis
  depends only on the backbone (`fit_basis`), so the cloud publishes it and a device caches it.

The maths lives here, below `protocol`, because in-process decoding and training need the same
round trip; `protocol.wire` puts the bytes on the wire.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from personalization.config import TAP_ENCODINGS
from personalization.errors import ConfigError

if TYPE_CHECKING:  # annotations only: importing this module stays light
    from personalization.backbone.frozen import Backbone

assert sys.byteorder == "little", "the encodings assume a little-endian host"

RAW = "raw-le"
LOWRANK = re.compile(r"lowrank(\d+)-int8")
#: the basis the cloud fits and publishes: the named low-rank encodings truncate it
BASIS_RANK = max(int(m.group(1)) for m in map(LOWRANK.fullmatch, TAP_ENCODINGS) if m)
#: the public text the low-rank bases are fitted on: general-knowledge sentences written for the
#: package, never user data
CORPUS = "codec_corpus.txt"
_SCALE = torch.float16  # scales travel as fp16


@dataclass(frozen=True)
class Basis:
    """A public per-rung basis: `mean` [R, H] and orthonormal `vectors` [R, H, K]."""

    rungs: tuple[int, ...]
    mean: Tensor
    vectors: Tensor

    def select(self, rungs: Sequence[int]) -> Basis:
        """The basis of a subset of its rungs (a session taps R of the backbone's L)."""
        missing = [k for k in rungs if k not in self.rungs]
        if missing:
            raise ConfigError(f"the basis has no rung {missing[0]} (it has {list(self.rungs)})")
        index = torch.tensor([self.rungs.index(k) for k in rungs])
        return Basis(tuple(rungs), self.mean[index], self.vectors[index])

    def truncate(self, k: int) -> Basis:
        if not 1 <= k <= self.vectors.shape[-1]:
            raise ConfigError(f"a rank-{k} basis needs 1 ≤ K ≤ {self.vectors.shape[-1]}")
        return Basis(self.rungs, self.mean, self.vectors[..., :k].contiguous())


class TapCodec:
    """One encoding of taps [..., R, H]; `bytes_per_position(R, H)` is what the books charge."""

    name: str

    def encode(self, taps: Tensor) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes, shape: Sequence[int]) -> Tensor:
        """Bytes back to float32 taps of `shape` [..., R, H]."""
        raise NotImplementedError

    def roundtrip(self, taps: Tensor) -> Tensor:
        """What the receiver decodes, in taps' own dtype (no bytes made)."""
        raise NotImplementedError

    def bytes_per_position(self, rungs: int, hidden: int) -> int:
        raise NotImplementedError


@dataclass(frozen=True)
class Raw(TapCodec):
    """Raw little-endian values of `dtype`."""

    dtype: torch.dtype = torch.float16
    name: str = RAW

    def encode(self, taps: Tensor) -> bytes:
        return _raw(taps.detach().to(self.dtype))

    def decode(self, data: bytes, shape: Sequence[int]) -> Tensor:
        return _frombytes(data, self.dtype, shape).float()

    def roundtrip(self, taps: Tensor) -> Tensor:
        return taps.to(self.dtype).to(taps.dtype)

    def bytes_per_position(self, rungs: int, hidden: int) -> int:
        return rungs * hidden * (torch.finfo(self.dtype).bits // 8)


@dataclass(frozen=True)
class Int8(TapCodec):
    """Per position and rung: round(x / s) in int8 with s = absmax / 127 (fp16)."""

    name: str = "int8"

    def encode(self, taps: Tensor) -> bytes:
        q, scale = _quantise(taps)
        return _raw(scale) + _raw(q)

    def decode(self, data: bytes, shape: Sequence[int]) -> Tensor:
        *lead, _h = shape
        scale, q = _split(data, lead, shape)
        return q.float() * scale.float()[..., None]

    def roundtrip(self, taps: Tensor) -> Tensor:
        q, scale = _quantise(taps)
        return (q.float() * scale.float()[..., None]).to(taps.dtype)

    def bytes_per_position(self, rungs: int, hidden: int) -> int:
        return rungs * (hidden + 2)


@dataclass(frozen=True)
class LowRankInt8(TapCodec):
    """Per rung: the K coefficients of (x − mean) on a public orthonormal basis, int8."""

    basis: Basis
    name: str = "lowrank-int8"

    @property
    def k(self) -> int:
        return self.basis.vectors.shape[-1]

    def _coefficients(self, taps: Tensor) -> Tensor:
        x = taps.float() - self.basis.mean
        return torch.einsum("...rh,rhk->...rk", x, self.basis.vectors)

    def _expand(self, c: Tensor) -> Tensor:
        return torch.einsum("...rk,rhk->...rh", c, self.basis.vectors) + self.basis.mean

    def encode(self, taps: Tensor) -> bytes:
        q, scale = _quantise(self._coefficients(taps))
        return _raw(scale) + _raw(q)

    def decode(self, data: bytes, shape: Sequence[int]) -> Tensor:
        *lead, _h = shape
        scale, q = _split(data, lead, (*lead, self.k))
        return self._expand(q.float() * scale.float()[..., None])

    def roundtrip(self, taps: Tensor) -> Tensor:
        q, scale = _quantise(self._coefficients(taps))
        return self._expand(q.float() * scale.float()[..., None]).to(taps.dtype)

    def bytes_per_position(self, rungs: int, hidden: int) -> int:
        return rungs * (self.k + 2)


def rank_of(name: str) -> int | None:
    """K of a `lowrank<K>-int8` name, None for the other encodings."""
    match = LOWRANK.fullmatch(name)
    return int(match.group(1)) if match else None


def make_codec(name: str, *, dtype: torch.dtype = torch.float16, basis: Basis | None = None):
    """The codec called `name`; a low-rank one needs the public `basis` (its rungs selected)."""
    if name == RAW:
        return Raw(dtype)
    if name == "int8":
        return Int8()
    k = rank_of(name)
    if k is None or name not in TAP_ENCODINGS:
        raise ConfigError(
            f"unknown tap encoding {name!r}; choose one of {', '.join(TAP_ENCODINGS)}"
        )
    if basis is None:
        raise ConfigError(f"{name} needs the backbone's public basis (fit_basis)")
    return LowRankInt8(basis.truncate(k), name=name)


# ---- the public basis ----------------------------------------------------------------------------
@torch.no_grad()
def fit_basis(backbone: Backbone, k: int = BASIS_RANK, *, chunk: int = 256) -> Basis:
    """The top-K principal directions of every rung's taps on the public corpus (no user data):
    what the cloud publishes at `GET /v1/codec/{name}`. Deterministic for a backbone."""
    text = resources.files("personalization").joinpath(CORPUS).read_text(encoding="utf-8")
    ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
    rungs = tuple(range(1, backbone.num_layers + 1))
    taps = []
    for start in range(0, len(ids), chunk):  # short windows, as prompts are
        piece = torch.tensor([ids[start : start + chunk]])
        taps.append(backbone(piece, rungs=rungs, logits=None).taps[0].float())
    x = torch.cat(taps)  # [N, L, H]
    mean = x.mean(0)
    k = min(k, x.shape[0], x.shape[-1])
    vectors = []
    for r in range(len(rungs)):
        _, _, vh = torch.linalg.svd(x[:, r] - mean[r], full_matrices=False)
        vectors.append(vh[:k].T)
    return Basis(rungs, mean, torch.stack(vectors).contiguous())


@functools.cache
def basis_for(backbone: Backbone) -> Basis:
    """`fit_basis`, once per backbone: kept in memory, and on disk under the cache directory by
    the backbone's fingerprint (the fit is a pass over the corpus; reading it back is not)."""
    from safetensors.torch import save_file

    from personalization.backbone.embedded import cache_dir
    from personalization.files import atomic_path, read_safetensors

    path = cache_dir() / "codecs" / f"{backbone.fingerprint}-k{BASIS_RANK}.safetensors"
    rungs = tuple(range(1, backbone.num_layers + 1))
    if path.is_file():
        try:
            _, t = read_safetensors(path, ConfigError, "cached tap-encoding basis")
            return Basis(rungs, t["mean"], t["vectors"])
        except (ConfigError, KeyError):  # unreadable: fit it again and replace it
            pass
    basis = fit_basis(backbone)
    with atomic_path(path) as tmp:
        save_file({"mean": basis.mean, "vectors": basis.vectors}, str(tmp))
    return basis


# ---- bytes -------------------------------------------------------------------------------------
def _quantise(x: Tensor) -> tuple[Tensor, Tensor]:
    """int8 values and fp16 scales per row of the last dimension (absmax / 127)."""
    x = x.float()
    scale = (x.abs().amax(-1) / 127).to(_SCALE)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    q = torch.clamp(torch.round(x / safe[..., None]), -127, 127).to(torch.int8)
    return q, scale


def _raw(x: Tensor) -> bytes:
    if not x.numel():  # e.g. no shared positions
        return b""
    return x.contiguous().view(torch.uint8).numpy().tobytes()


def _frombytes(data: bytes, dtype: torch.dtype, shape: Sequence[int]) -> Tensor:
    if not data:
        return torch.zeros(tuple(shape), dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(*shape)


def _split(data: bytes, lead: Sequence[int], values: Sequence[int]) -> tuple[Tensor, Tensor]:
    """fp16 scales [*lead] then int8 values [*values] (the layout `encode` writes)."""
    n = 1
    for d in lead:
        n *= d
    cut = 2 * n
    return _frombytes(data[:cut], _SCALE, lead), _frombytes(data[cut:], torch.int8, values)
