"""Replicas for real (slow): PostgreSQL, two `spa cloud` replicas on it and nginx running the
docs' routing snippet, all processes of their own on 127.0.0.1 (Debian's packages; skipped,
saying why, where they are missing). Devices open sessions through nginx; sessions land on both
replicas and stream through the proxy; replica r1 is SIGKILLed mid-stream
(`benchmarks/replicas.py` runs the same scenario and records it)."""

from __future__ import annotations

import pytest

from benchmarks.replicas import kill_mid_stream, replica_stack, summarise
from benchmarks.services import Unavailable

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DEVICES, TOKENS = 6, 96


def test_a_replica_killed_mid_stream_loses_its_sessions_cleanly_and_nothing_else(tmp_path):
    try:
        with replica_stack(tmp_path) as (url, front, replicas):
            report = kill_mid_stream(url, front, replicas, tmp_path, devices=DEVICES, tokens=TOKENS)
    except Unavailable as exc:
        pytest.skip(str(exc))
    devices = report["devices"]
    assert {d["replica"] for d in devices} == {"r1", "r2"}, devices  # nginx spread them
    assert all(0 < d["tokens_before_kill"] < TOKENS for d in devices), devices  # mid-stream
    assert report["registered_devices"] == DEVICES  # registered through either replica
    for d in devices:
        record = d["record"]  # every admitted session has its row, none half-written
        assert record is not None and record["setting"] == "lst", d
        assert record["max_new_tokens"] == TOKENS and record["prompt_tokens"] > 0, d
        if d["replica"] == "r2":  # untouched: every token, a finished session and record
            assert (d["status"], d["tokens"], d["proxy_5xx"]) == ("finished", TOKENS, 0), d
            assert record["status"] == "finished" and record["tokens"] == TOKENS, d
            assert record["device_contacts"] == TOKENS and record["finished"], d
        else:  # a clear error, soon: never a hang, never nginx's HTML page
            assert d["status"] == "error" and "cloud" in d["error"].lower(), d
            assert "<html" not in d["error"].lower() and d["seconds_after_kill"] < 60, d
    summary = summarise(report)
    assert summary["surviving_5xx"] == summary["lost_records"] == 0
    assert summary["killed_clear_errors"] == summary["sessions_r1"]
