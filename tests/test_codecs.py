"""Tap encodings: each round trip within its stated bound, bytes exactly as charged, and the same
round trip in-process, in training and over the wire."""

from __future__ import annotations

import pytest
import torch

from personalization.codecs import (
    RAW,
    Basis,
    Int8,
    LowRankInt8,
    Raw,
    basis_for,
    fit_basis,
    make_codec,
)
from personalization.config import TAP_ENCODINGS, SPAConfig
from personalization.errors import ConfigError
from personalization.model import SPAModel
from protocol import wire

R, H = 3, 64


def _taps(*lead: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, R, H, generator=g)
    x[..., 0] *= 40  # residual streams have a few outlier dimensions
    return x


def _basis(k: int = 8) -> Basis:
    g = torch.Generator().manual_seed(1)
    vectors = torch.linalg.qr(torch.randn(R, H, k, generator=g)).Q  # orthonormal columns
    return Basis((1, 2, 3), torch.randn(R, H, generator=g), vectors)


@pytest.mark.parametrize("codec", [Raw(), Int8(), LowRankInt8(_basis())], ids=lambda c: c.name)
def test_bytes_decode_to_the_round_trip_and_cost_what_the_books_charge(codec):
    x = _taps(2, 5)
    data = codec.encode(x)
    assert len(data) == 2 * 5 * codec.bytes_per_position(R, H)
    assert torch.equal(codec.decode(data, x.shape), codec.roundtrip(x).float())


def test_raw_fp16_is_within_fp16_rounding():
    x = _taps(4)
    assert torch.allclose(Raw().roundtrip(x), x, rtol=2**-11, atol=2**-24)


def test_int8_error_is_within_half_a_step_of_each_rows_absmax():
    x = _taps(16)
    err = (Int8().roundtrip(x) - x).abs().amax(-1)
    absmax = x.abs().amax(-1)
    # half a quantisation step (absmax / 254), plus the fp16 rounding of the scale
    assert bool((err <= absmax * (1 / 254 + 127 * 2**-11)).all())
    assert Int8().bytes_per_position(8, 576) == 8 * 578  # SmolLM2: 4,624 B, not 9,216


def test_lowrank_keeps_the_subspace_and_drops_the_rest():
    basis = _basis(k=8)
    codec = LowRankInt8(basis)
    c = torch.randn(10, R, 8)
    inside = basis.mean + torch.einsum("...rk,rhk->...rh", c, basis.vectors)
    err = (codec.roundtrip(inside) - inside).norm(dim=-1)
    # only the coefficients' int8 rounding is lost: ≤ √K · absmax(c) / 254 (+ the scale's fp16)
    bound = 8**0.5 * c.abs().amax(-1) * (1 / 254 + 127 * 2**-11)
    assert bool((err <= bound + 1e-5).all())
    outside = inside + torch.randn(10, R, H)
    projected = basis.mean + torch.einsum(
        "...rk,rhk->...rh",
        torch.einsum("...rh,rhk->...rk", outside - basis.mean, basis.vectors),
        basis.vectors,
    )
    assert torch.allclose(codec.roundtrip(outside), projected, atol=0.05 * projected.abs().max())
    assert codec.bytes_per_position(8, 576) == 8 * (8 + 2)


def test_names_come_from_the_vocabulary_and_unknown_ones_are_refused():
    basis = _basis(k=64)
    for name in TAP_ENCODINGS:
        assert make_codec(name, basis=basis).name == name
    assert make_codec("lowrank32-int8", basis=basis).bytes_per_position(R, H) == R * 34
    with pytest.raises(ConfigError, match="unknown tap encoding 'zip'; choose one of raw-le"):
        make_codec("zip")
    with pytest.raises(ConfigError, match="unknown tap encoding"):
        SPAConfig(tap_encoding="zip")


def test_the_public_basis_is_orthonormal_deterministic_and_fitted_on_every_rung(tiny_llama):
    a, b = fit_basis(tiny_llama), fit_basis(tiny_llama)
    assert a.rungs == tuple(range(1, tiny_llama.num_layers + 1))
    assert torch.equal(a.vectors, b.vectors) and torch.equal(a.mean, b.mean)
    gram = torch.einsum("rhk,rhj->rkj", a.vectors, a.vectors)
    assert torch.allclose(gram, torch.eye(a.vectors.shape[-1]).expand_as(gram), atol=1e-4)
    assert a.select((2,)).vectors.shape == (1, tiny_llama.hidden_size, 64)


@pytest.mark.parametrize("encoding", TAP_ENCODINGS)
def test_the_model_charges_and_rounds_taps_by_its_encoding(tiny_llama, encoding):
    model = SPAModel(tiny_llama, SPAConfig(tap_encoding=encoding))
    codec = model.codec
    assert codec.name == encoding
    x = _taps_for(model)
    assert torch.equal(model.wire_taps(x), codec.roundtrip(x))
    raw = wire.encode_taps(x[None], 0, codec)
    assert len(raw) == x.shape[0] * model.tap_bytes
    assert torch.equal(wire.decode_taps(raw, codec, 1, 0, x.shape), codec.roundtrip(x)[None])
    if encoding == RAW:
        assert model.tap_bytes == len(model.rungs) * tiny_llama.hidden_size * 2
    else:
        assert model.tap_bytes < len(model.rungs) * tiny_llama.hidden_size * 2
    assert basis_for(tiny_llama) is basis_for(tiny_llama)  # fitted once per backbone


def _taps_for(model: SPAModel) -> torch.Tensor:
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    return model.backbone(ids, rungs=model.rungs, logits=None).taps[0]


def test_a_truncated_byte_string_is_a_wire_error():
    codec = Int8()
    data = codec.encode(_taps(1, 3))
    with pytest.raises(wire.WireError, match="int8 needs"):
        wire.decode_taps(data[:-1], codec, 1, 0, (3, R, H))


def test_the_basis_is_fitted_once_and_kept_on_disk_by_fingerprint(
    tiny_llama, tmp_path, monkeypatch
):
    """A second process reads the basis back instead of refitting it; a damaged file is refitted
    and replaced."""
    monkeypatch.setenv("SPA_CACHE_DIR", str(tmp_path))
    basis_for.cache_clear()
    fitted = basis_for(tiny_llama)
    (path,) = (tmp_path / "codecs").iterdir()
    assert path.name.startswith(tiny_llama.fingerprint)
    basis_for.cache_clear()  # as a new process would
    read = basis_for(tiny_llama)
    assert torch.equal(read.vectors, fitted.vectors) and torch.equal(read.mean, fitted.mean)
    path.write_bytes(b"half a file")
    basis_for.cache_clear()
    again = basis_for(tiny_llama)
    assert torch.equal(again.vectors, fitted.vectors) and path.stat().st_size > 100
    basis_for.cache_clear()
