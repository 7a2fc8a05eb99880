"""The cloud's small parts on their own: wire encodings, settings from the environment, records."""

from __future__ import annotations

import re

import pytest
import torch

from cloud_api.db import Records, SessionRow
from cloud_api.settings import CloudSettings
from protocol import wire


@pytest.mark.parametrize("dtype", list(wire.DTYPES))
def test_raw_encoding_round_trips_at_the_wire_precision(dtype: str):
    x = torch.randn(5, 2, 64)
    data = wire.encode(x, dtype)
    assert len(data) == x.numel() * wire.itemsize(dtype)
    back = wire.decode(data, dtype, (5, 2, 64))
    assert back.dtype == wire.DTYPES[dtype]
    assert torch.equal(back, x.to(wire.DTYPES[dtype]))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bytes(126), "expected 64 float16 values of shape [1, 64] (128 bytes), got 126 bytes"),
        (wire.encode(torch.full((1, 64), float("nan")), "float16"), "NaN or infinite"),
        (wire.encode(torch.full((1, 64), 1e6), "float16"), "NaN or infinite"),  # overflows fp16
    ],
)
def test_raw_decoding_refuses_wrong_sizes_and_non_finite_values(data: bytes, message: str):
    with pytest.raises(wire.WireError, match=re.escape(message)):
        wire.decode(data, "float16", (1, 64), what="g(x)")


def test_safetensors_payloads_round_trip_and_bad_bytes_are_refused():
    tensors = {"0.taps": torch.randn(3, 1, 4).half(), "0.labels": torch.tensor([1, 2])}
    back = wire.unpack(wire.pack(tensors, {"format": "x"}))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    with pytest.raises(wire.WireError, match="not a safetensors payload"):
        wire.unpack(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")


def test_settings_read_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPA_BACKBONE", "tiny-gpt2")
    monkeypatch.setenv("SPA_CLOUD_MAX_SESSIONS", "3")
    monkeypatch.setenv("SPA_CACHE_DIR", str(tmp_path))
    settings = CloudSettings()
    assert settings.backbone == "tiny-gpt2" and settings.max_sessions == 3
    assert settings.database_url == f"sqlite:///{tmp_path / 'cloud.db'}"
    monkeypatch.setenv("SPA_CLOUD_BACKBONE", "tiny-llama")  # the cloud's own variable wins
    assert CloudSettings().backbone == "tiny-llama"
    assert CloudSettings(backbone="x", max_sessions=9).max_sessions == 9  # arguments win


def test_records_keep_devices_sessions_and_totals(tmp_path):
    records = Records(f"sqlite:///{tmp_path / 'sub' / 'records.db'}")
    records.add_device("d1", "phone", "h" * 64)
    shape = {"rungs": "2", "tap_dtype": "float16", "prompt_tokens": 5, "max_new_tokens": 8}
    records.add_session(
        SessionRow(
            id="s1", device_id="d1", setting="spa", strategy="greedy", deadline_s=1.0, **shape
        )
    )
    records.update_session("s1", tokens=8, fallbacks=2, bytes_to_device=1000, status="running")
    assert records.device_by_token_hash("h" * 64).name == "phone"
    assert records.close_stale("restart") == 1  # a live session a dead process left behind
    records.close()
    reopened = Records(f"sqlite:///{tmp_path / 'sub' / 'records.db'}")
    stored = reopened.get_session("s1")
    assert (stored.tokens, stored.fallbacks, stored.bytes_to_device) == (8, 2, 1000)
    assert stored.status == "expired" and stored.reason == "restart"
    assert [s.id for s in reopened.sessions_of("d1")] == ["s1"]
    reopened.close()


# ---- the step scheduler's chunked prefill -------------------------------------------------------
@pytest.mark.parametrize("chunk", [5, 8, 64])
def test_a_prefill_chunk_boundary_changes_nothing(tiny, chunk):
    """A long prompt prefilled `chunk` tokens per pass (each its own scheduler round) gives the
    hidden states, taps and logits of one pass, and the same greedy tokens after it."""
    import math
    import threading

    from cloud_api.scheduler import BatchedBackbone, StepScheduler
    from personalization.config import DecodeConfig, SPAConfig
    from personalization.decoding import generate
    from personalization.model import SPAModel

    scheduler = StepScheduler(tiny, threading.Lock(), prefill_chunk=chunk)
    try:
        batched = BatchedBackbone(tiny, scheduler)
        prompt, rungs = list(range(5, 28)), (1, tiny.num_layers)  # 23 tokens
        ids = torch.tensor([prompt])
        mine = batched(ids, cache=tiny.new_cache(), rungs=rungs, logits="last")
        theirs = tiny(ids, cache=tiny.new_cache(), rungs=rungs, logits="last")
        for a, b in ((mine.hidden, theirs.hidden), (mine.taps, theirs.taps)):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.logits, theirs.logits, atol=1e-4, rtol=1e-4)
        assert scheduler.stats.prefills == math.ceil(len(prompt) / chunk)
        decode = DecodeConfig(max_new_tokens=8)
        base = SPAConfig(setting="base")
        chunked = generate(SPAModel(batched, base), prompt, decode)
        whole = generate(SPAModel(tiny, base), prompt, decode)
        assert [t.id for t in chunked.tokens] == [t.id for t in whole.tokens]
    finally:
        scheduler.close()
