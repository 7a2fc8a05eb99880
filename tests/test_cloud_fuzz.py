"""Schemathesis fuzzes every operation of /openapi.json, with inputs that fit the schema and
inputs that break it, against a real server: whatever arrives, the answer is never a 5xx.
Bounded: a fixed number of examples per operation and mode."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from cloud_client import CloudClient
from cloud_server import running
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

EXAMPLES = 40  # per operation and mode: over 1,000 calls in all (each mode asserts ≥ 500)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """Its own server, with small limits, so fuzzed sessions and devices stay out of the way."""
    limits = {
        "max_prompt_tokens": 64,
        "max_new_tokens": 4,
        "max_body_bytes": 64 * 1024,
        "features_max_batch": 2,
        "features_max_tokens": 64,
        "max_sessions": 4,
        "max_deadline_s": 1.0,
    }
    with running(tmp_path_factory.mktemp("fuzz"), **limits) as server:
        client = CloudClient.register(server.url, "fuzzer")
        yield server, client.http.headers["authorization"]
        client.close()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_gets_a_server_error(fuzzed, mode):
    server, authorization = fuzzed
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    calls: list[int] = []
    answered = {op.label: _fuzz(op, mode, authorization, server.url, calls) for op in operations}
    assert len(calls) >= 500, len(calls)
    exercised = {label for label, codes in answered.items() if codes}
    # every operation was called; in negative mode, those with any input to break
    assert len(exercised) == len(operations) if mode == "positive" else len(exercised) >= 10
    assert not {c for codes in answered.values() for c in codes if c >= 500}
    # no operation retired the shared token: every other one was fuzzed past authentication
    info = httpx.get(f"{server.url}/v1/info", headers={"Authorization": authorization})
    assert info.status_code == 200


#: operations that retire the token they are called with: each case gets a fresh device, so the
#: shared one keeps working for every other operation
TOKEN_CHANGING = {"DELETE /v1/devices/me", "POST /v1/devices/me/token"}


def _fuzz(
    operation, mode: GenerationMode, authorization: str, url: str, calls: list[int]
) -> set[int]:
    """Call one operation with EXAMPLES generated inputs; the status codes it answered."""
    seen: set[int] = set()

    def token() -> str:
        if operation.label not in TOKEN_CHANGING:
            return authorization
        return "Bearer " + httpx.post(f"{url}/v1/devices", json={"name": "fuzz"}).json()["token"]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def fuzz(case):
        response = case.call(headers={"Authorization": token()}, timeout=30)
        seen.add(response.status_code)
        calls.append(response.status_code)
        assert response.status_code < 500, (case.as_curl_command(), response.text)

    try:
        fuzz()
    except Unsatisfiable:  # negative mode, an operation without inputs: nothing to break
        assert mode == "negative" and not seen
    return seen
