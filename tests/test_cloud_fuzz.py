"""Schemathesis fuzzes every operation of /openapi.json, with inputs that fit the schema and
inputs that break it, against a real server: whatever arrives, the answer is never a 5xx.
Bounded: a fixed number of examples per operation and mode."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
import schemathesis
from cloud_server import running
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from benchmarks.bare_device import CloudClient

EXAMPLES = 40  # per operation and mode: over 1,000 calls in all (each mode asserts ≥ 500)
OPERATOR = "fuzz-operator-token"


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
        "operator_token": OPERATOR,
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


def test_linked_calls_never_get_a_server_error(tmp_path):
    """Stateful: schemathesis chains the calls by the links it infers from the schema — a
    session's id into its events, record, answers, verdicts and cancel; a registered device's id
    into the operator's delete — and each device registered on the way signs the calls after it
    (register → session → events → answer). No sequence gets a 5xx."""
    with running(tmp_path, max_sessions=256, max_deadline_s=1.0, operator_token=OPERATOR) as server:
        _linked(server)


def _linked(server) -> None:
    token = httpx.post(f"{server.url}/v1/devices", json={"name": "linked"}).json()["token"]
    authorization = f"Bearer {token}"
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    seen: Counter = Counter()

    class Calls(schema.as_state_machine()):
        token, device = authorization, None

        def setup(self):
            self.sessions: list[str] = []
            self.opened = 0

        def get_call_kwargs(self, case):
            label = case.operation.label
            if label in TOKEN_CHANGING and self.token == authorization:  # keep the shared one
                body = httpx.post(f"{server.url}/v1/devices", json={"name": "fuzz"}).json()
                self.token, self.device = "Bearer " + body["token"], body["device_id"]
            operator = label == "DELETE /v1/devices/{device_id}"
            auth = f"Bearer {OPERATOR}" if operator else self.token
            return {"headers": {"Authorization": auth}, "timeout": 30}

        def before_call(self, case):
            """Every other session body is made valid — most generated ones are refused (422),
            and the links after a session need one that exists; strict spa asks every token,
            waiting up to the server's 1 s cap (at 0.3 s a busy machine's sessions had ended
            before a linked answer came, and no answer reached a live one)."""
            if case.operation.label != "POST /v1/sessions":
                return
            self.opened += 1
            if self.opened % 2:
                strict = self.opened % 4 == 1
                case.body = {
                    "prompt": "Tell me about the sea.",
                    "setting": "spa" if strict else "base",
                    "strict": strict,
                    "deadline_s": 1.0,
                    "decoding": {"max_new_tokens": 3},
                }

        def after_call(self, response, case):
            label = case.operation.label
            seen[label, response.status_code] += 1
            if response.status_code >= 300:
                return
            if label == "POST /v1/sessions":
                self.sessions.append(response.json()["session_id"])
            if label in ("POST /v1/devices", "POST /v1/devices/me/token"):
                body = response.json()
                self.token, self.device = "Bearer " + body["token"], body["device_id"]
            elif label == "DELETE /v1/devices/me" or (
                label == "DELETE /v1/devices/{device_id}"
                and case.path_parameters["device_id"] == self.device
            ):  # ours is gone: back to the shared device
                self.token = authorization

        def teardown(self):  # sessions never streamed would hold the cap until their TTL
            for sid in self.sessions:
                httpx.post(
                    f"{server.url}/v1/sessions/{sid}/cancel", headers={"Authorization": self.token}
                )

        def validate_response(self, response, case, **kwargs):
            assert response.status_code < 500, (case.as_curl_command(), response.text)

    Calls.run(
        settings=settings(
            max_examples=40,
            stateful_step_count=8,
            deadline=None,
            database=None,
            # the same call sequences every run: whether a random draw happens to link a session
            # to its events must not decide a run (one full run of three drew none)
            derandomize=True,
            phases=[Phase.generate],  # the server's state differs on a replay: no shrinking
            suppress_health_check=list(HealthCheck),
        )
    )
    ok = lambda label: sum(n for (op, code), n in seen.items() if op == label and code < 300)  # noqa: E731
    assert sum(seen.values()) >= 100, seen
    assert ok("POST /v1/sessions") and ok("GET /v1/sessions/{session_id}/events"), seen
    assert ok("GET /v1/sessions/{session_id}"), seen  # a created session's id reached its record
    answer = "POST /v1/sessions/{session_id}/side-requests/{request_id}/answer"
    # an answer reached a live session: refused for its request id or payload, not "no session"
    assert sum(n for (op, code), n in seen.items() if op == answer and code != 404), seen
