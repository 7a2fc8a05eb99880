"""The binary encodings that cross the wire between cloud and device (both sides use this).

* Taps: the session's tap encoding (`personalization.codecs`: raw-le values of the wire dtype,
  int8, or int8 coefficients on a public low-rank basis), no header — the shape and encoding
  travel in the JSON event that carries them (base64 inside an NDJSON line). Bytes on the wire
  are what the latency model charges for.
* g(x): raw values of the wire dtype (float16 by default), little-endian, C order, no header —
  fixed by the session (an answer is exactly H values per row).
* Features and the frozen head: safetensors bytes (a JSON header naming every tensor's dtype and
  shape, then the raw data), readable by `safetensors.torch.load` on the device.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import sys
from collections.abc import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor

from personalization.codecs import TapCodec
from personalization.config import WIRE_DTYPES
from personalization.errors import SpaError

#: the wire dtypes (personalization.config.WIRE_DTYPES) as torch dtypes
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in WIRE_DTYPES}

assert sys.byteorder == "little", "the raw encoding assumes a little-endian host"


class WireError(SpaError, ValueError):
    """Bytes that do not decode to what the protocol says they must be (a 4xx, not a crash)."""


def itemsize(dtype: str) -> int:
    return torch.finfo(DTYPES[dtype]).bits // 8


def encode(x: Tensor, dtype: str) -> bytes:
    """A tensor as raw little-endian values of `dtype`."""
    return x.detach().to(DTYPES[dtype]).contiguous().view(torch.uint8).numpy().tobytes()


def decode(data: bytes, dtype: str, shape: Sequence[int], *, what: str = "tensor") -> Tensor:
    """Raw bytes back to a tensor of `shape`; refuses a wrong length and NaN/Inf values."""
    if dtype not in DTYPES:
        raise WireError(f"{what}: unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    count = 1
    for n in shape:
        count *= n
    expected = count * itemsize(dtype)
    if len(data) != expected:
        raise WireError(
            f"{what}: expected {count} {dtype} values of shape {list(shape)} ({expected} bytes), "
            f"got {len(data)} bytes"
        )
    if count == 0:
        return torch.zeros(shape, dtype=DTYPES[dtype])
    x = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(DTYPES[dtype]).reshape(*shape)
    if not bool(torch.isfinite(x).all()):
        raise WireError(f"{what}: contains NaN or infinite values")
    return x


def encode_taps(taps: Tensor, shared: int, codec: TapCodec) -> bytes:
    """Taps [B, t, R, H] of a side request in the session's encoding: the `shared` leading
    positions once (identical in every row: a beam search's prompt), then each row's others."""
    return codec.encode(taps[0, :shared]) + codec.encode(taps[:, shared:])


def decode_taps(
    data: bytes, codec: TapCodec, rows: int, shared: int, shape: Sequence[int]
) -> Tensor:
    """`encode_taps` back to float32 [rows, t, R, H] (`shape` = [t, R, H]); a wrong length or a
    value that is not finite is a WireError."""
    t, rungs, hidden = shape
    if not 0 <= shared <= t or rows < 1:
        raise WireError(f"taps: {rows} rows with {shared} shared of {t} positions is not a shape")
    per = codec.bytes_per_position(rungs, hidden)
    cut, expected = shared * per, (shared + rows * (t - shared)) * per
    if len(data) != expected:
        raise WireError(
            f"taps: {codec.name} needs {expected} bytes for {shared} shared + {rows} × "
            f"{t - shared} positions of {rungs} rungs × {hidden}, got {len(data)}"
        )
    head = codec.decode(data[:cut], (1, shared, rungs, hidden))
    rest = codec.decode(data[cut:], (rows, t - shared, rungs, hidden))
    taps = torch.cat([head.expand(rows, -1, -1, -1), rest], dim=1)
    if not bool(torch.isfinite(taps).all()):
        raise WireError("taps: contains NaN or infinite values")
    return taps


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, *, what: str = "value") -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise WireError(f"{what}: not valid base64") from None


def pack(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes (every tensor contiguous, metadata as strings)."""
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def unpack(data: bytes) -> dict[str, Tensor]:
    try:
        return load(data)
    except (SafetensorError, ValueError) as exc:
        raise WireError(f"not a safetensors payload: {exc}") from None


def unpack_with_metadata(data: bytes) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and the string metadata of a safetensors payload (its JSON header's
    `__metadata__`, which `safetensors.torch.load` drops)."""
    tensors = unpack(data)
    try:
        (size,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    except (struct.error, ValueError) as exc:
        raise WireError(f"unreadable safetensors header: {exc}") from None
    return tensors, meta


def pack_bits(mask: Tensor) -> bytes:
    """A boolean tensor as bits (row-major, the last byte zero-padded)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    bits = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (bits * weights).sum(1, dtype=torch.uint8).numpy().tobytes()


def unpack_bits(data: bytes, shape: Sequence[int], *, what: str = "mask") -> Tensor:
    """`pack_bits` back to a boolean tensor of `shape` (a WireError if the length is wrong)."""
    n = 1
    for size in shape:
        n *= size
    if len(data) != (n + 7) // 8 or any(size < 0 for size in shape):
        raise WireError(f"{what}: {len(data)} bytes is not {list(shape)} packed as bits")
    raw = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.zeros(0, dtype=torch.uint8)
    )
    shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
    bits = (raw[:, None] >> shifts) & 1
    return bits.reshape(-1)[:n].bool().reshape(*shape)
