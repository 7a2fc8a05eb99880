"""The protocol's typed events: what the cloud writes, the device reads back unchanged."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from personalization.codecs import Int8, Raw
from protocol import wire
from protocol.events import (
    DoneEvent,
    SideRequestEvent,
    StartEvent,
    TapsEvent,
    TokenEvent,
    parse_event,
)
from protocol.messages import RecommendIn, SessionIn, SessionTotals

EVENTS = [
    StartEvent(
        session_id="s1",
        prompt_tokens=7,
        setting="spa",
        strict=False,
        rungs=[1, 2],
        hidden_size=4,
        tap_dtype="float16",
        tap_encoding="int8",
        tap_mode="streamed",
        deadline_s=5.0,
    ),
    TapsEvent(start=7, positions=1, shape=[1, 2, 4], dtype="float16", encoding="int8", taps=""),
    SideRequestEvent(
        request_id=1,
        start=0,
        positions=3,
        shape=[3, 2, 4],
        rows=2,
        shared=2,
        reorder=[1, 0],
        dtype="float16",
        deadline_s=5.0,
        taps="",
    ),
    TokenEvent(
        index=0,
        id=42,
        text=" hi",
        branch="device",
        gate_prob=0.75,
        request_id=1,
        cloud_ms=1.5,
        device_wait_ms=3.25,
        bytes_to_device=120,
        bytes_from_device=16,
    ),
    DoneEvent(status="finished", steps=3, M=1 / 3, totals=SessionTotals(tokens=3)),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.event)
def test_every_event_round_trips_through_one_ndjson_line(event):
    line = event.to_line()
    assert line.startswith(b'{"event":"' + event.event.encode()) and line.endswith(b"}\n")
    assert line.count(b"\n") == 1
    assert parse_event(line) == event and type(parse_event(line)) is type(event)


def test_side_request_taps_decode_to_rows_with_the_shared_prompt_once():
    taps = torch.randn(2, 3, 2, 4)
    taps[1, :2] = taps[0, :2]  # the shared prompt positions are identical in every row
    raw = wire.encode_taps(taps, 2, Raw())
    assert len(raw) == (2 + 2 * 1) * 2 * 4 * 2  # shared positions once, then each row's own
    event = EVENTS[2].model_copy(update={"taps": wire.b64encode(raw)})
    assert torch.equal(parse_event(event.to_line()).decode_taps(Raw()), taps.half().float())
    with pytest.raises(wire.WireError, match="taps are raw-le, the device expects int8"):
        event.decode_taps(Int8())


def test_malformed_lines_are_refused():
    with pytest.raises(ValidationError):
        parse_event(b'{"event":"teleport"}')
    with pytest.raises(ValidationError):
        parse_event(b'{"event":"token","index":0}')  # fields missing
    bad = EVENTS[2].model_copy(update={"taps": "not base64!"})
    with pytest.raises(wire.WireError, match="taps: not valid base64"):
        bad.decode_taps(Raw())


def test_a_history_takes_the_catalogues_long_titles_and_refuses_absurd_ones():
    """Beauty's catalogue has 21 titles over 512 characters (the longest 879): a user who bought
    one must still get recommendations (this was a 422 before)."""
    import json
    from pathlib import Path

    items = Path(__file__).resolve().parents[2] / "shared/data/beauty_items.json"
    longest = max(json.loads(items.read_text()), key=len) if items.is_file() else "x" * 879
    assert RecommendIn(history=["soap", longest]).history[1] == longest
    with pytest.raises(ValidationError, match="at most 2048"):
        RecommendIn(history=["x" * 2049])


def test_a_prompt_is_text_ids_or_a_conversation_never_a_mix():
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    conversation = SessionIn(prompt=turns, setting="base").conversation
    assert [m.role for m in conversation] == ["system", "user"]
    assert SessionIn(prompt="Hi?", setting="base").conversation is None
    assert SessionIn(prompt=[1, 2], setting="base").conversation is None
    for bad in (
        {"prompt": turns, "system": "Be brief."},  # two system messages
        {"prompt": turns, "chat": False},  # a conversation is always templated
        {"prompt": [{"role": "tool", "content": "x"}]},
        {"prompt": [1, {"role": "user", "content": "x"}]},
    ):
        with pytest.raises(ValidationError):
            SessionIn(setting="base", **bad)
