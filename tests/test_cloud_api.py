"""The cloud API's surface against a real uvicorn server (tiny backbone): health and info, the
training endpoints, auth isolation between devices, and a 4xx with a clear message for every
kind of bad input — after which the server still serves everyone."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
import torch
from cloud_server import running
from safetensors.torch import load

from benchmarks.bare_device import CloudClient, device, from_raw
from personalization.backbone.frozen import Backbone
from personalization.backbone.tiny import tiny_backbone
from personalization.config import SERVED_SETTINGS, STRATEGIES
from personalization.training.data import Example
from personalization.training.features import backbone_features, source_id
from protocol import PROTOCOL_VERSION
from protocol.wire import unpack_with_metadata

MAX_PROMPT, MAX_NEW, MAX_BODY, MAX_BATCH, MAX_TOKENS = 64, 32, 32 * 1024, 4, 96


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    limits = {
        "max_prompt_tokens": MAX_PROMPT,
        "max_new_tokens": MAX_NEW,
        "max_body_bytes": MAX_BODY,
        "features_max_batch": MAX_BATCH,
        "features_max_tokens": MAX_TOKENS,
        "max_deadline_s": 30.0,
    }
    with running(tmp_path_factory.mktemp("cloud"), **limits) as server:
        yield server


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return tiny_backbone("llama")


@pytest.fixture(scope="module")
def client(server):
    with device(server.url, "main") as client:
        yield client


def _prompt(backbone: Backbone) -> list[int]:
    return backbone.encode_prompt("hello there")


# ---- health, info, spec ----------------------------------------------------------------------
def test_health_ready_info_and_openapi(server, client, backbone):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").json() == {"status": "ready", "backbone": "tiny-llama"}
    info = client.http.get("/v1/info").json()
    assert info | {"num_layers": 2, "hidden_size": 64, "vocab_size": 259} == info
    assert info["backbone"] == "tiny-llama" and info["fingerprint"] == backbone.fingerprint
    assert info["rungs_offered"] == [1, 2] and info["tap_dtype"] == "float16"
    assert info["limits"]["max_prompt_tokens"] == MAX_PROMPT and info["version"]
    # the protocol version a device checks, and the vocabulary the cloud serves
    assert info["protocol_version"] == PROTOCOL_VERSION
    assert info["settings"] == list(SERVED_SETTINGS) and info["strategies"] == list(STRATEGIES)
    spec = httpx.get(f"{server.url}/openapi.json").json()
    paths = set(spec["paths"])
    assert {"/v1/devices", "/v1/info", "/v1/features", "/v1/head", "/v1/sessions"} <= paths
    answer = spec["paths"]["/v1/sessions/{session_id}/side-requests/{request_id}/answer"]
    assert set(answer["post"]["requestBody"]["content"]) == {
        "application/octet-stream",
        "application/json",
    }


def test_readyz_reports_a_backbone_that_failed_to_load(tmp_path):
    settings = {"database_url": f"sqlite:///{tmp_path / 'c.db'}", "port": 0}
    from cloud_api.server import ThreadedServer
    from cloud_api.settings import CloudSettings

    bad = CloudSettings(backbone=str(tmp_path / "no-such-model"), **settings)
    with ThreadedServer(bad) as server:
        server.cloud.loaded.wait(30)
        ready = httpx.get(f"{server.url}/readyz")
        client = CloudClient.register(server.url)
        info = client.http.get("/v1/info")
        client.close()
    assert ready.status_code == 503 and ready.json()["status"] == "failed"
    assert "does not exist" in ready.json()["detail"]
    assert info.status_code == 503 and "failed to load" in info.json()["detail"]


# ---- training endpoints ------------------------------------------------------------------------
def test_features_equal_in_process_backbone_features(client, backbone):
    ids_example = Example(tuple(_prompt(backbone)), (70, 71, 72, 2))
    text_prompt, text_target = "what colour is the sky?", "blue"
    response = client.http.post(
        "/v1/features",
        json={
            "examples": [
                {"prompt": list(ids_example.prompt), "target": list(ids_example.target)},
                {"prompt": text_prompt, "target": text_target},
            ],
            "rungs": [1, 2],
        },
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    tensors = load(response.content)
    target = backbone.tokenizer(text_target, add_special_tokens=False)["input_ids"]
    text_example = Example(tuple(backbone.encode_prompt(text_prompt)), (*target, 2))
    for i, example in enumerate([ids_example, text_example]):
        want = backbone_features(backbone, example, (1, 2), torch.float16).to_dict()
        for key, value in want.items():
            got = tensors[f"{i}.{key}"]
            assert got.dtype == value.dtype and torch.equal(got, value), key
    assert tensors["0.taps"].shape == (len(ids_example.ids) - 1, 2, 64)
    header_len = int.from_bytes(response.content[:8], "little")
    metadata = json.loads(response.content[8 : 8 + header_len])["__metadata__"]
    assert metadata["source_id"] == source_id(backbone.fingerprint, (1, 2), "float16")
    assert metadata["count"] == "2" and metadata["format"] == "spa-features/1"


def test_head_reproduces_the_backbones_logits(client, backbone):
    response = client.http.get("/v1/head", params={"dtype": "float32"})
    tensors = load(response.content)
    assert set(tensors) == {"final_norm.weight", "lm_head.weight"}
    f = torch.randn(3, backbone.hidden_size)
    norm = torch.nn.RMSNorm(backbone.hidden_size, eps=backbone.final_norm.variance_epsilon)
    norm.load_state_dict({"weight": tensors["final_norm.weight"]})
    with torch.no_grad():
        logits = norm(f) @ tensors["lm_head.weight"].T
        torch.testing.assert_close(logits, backbone.head(f), atol=1e-5, rtol=1e-5)
    half = load(client.http.get("/v1/head").content)  # fp16 by default
    assert half["lm_head.weight"].dtype == torch.float16


def test_codec_publishes_the_public_basis_with_the_backbones_fingerprint(client, backbone):
    from personalization.codecs import fit_basis

    response = client.http.get("/v1/codec/lowrank32-int8")
    tensors, meta = unpack_with_metadata(response.content)
    assert meta["fingerprint"] == backbone.fingerprint and meta["rank"] == "32"
    expected = fit_basis(backbone).truncate(32)  # fitted on the public corpus alone
    assert torch.equal(tensors["mean"], expected.mean)
    # the same directions: an SVD's last bits (and a vector's sign) depend on the thread count
    # the cloud fitted with, so compare each published vector's cosine with its counterpart
    cosines = (tensors["vectors"] * expected.vectors).sum(-2).abs()
    torch.testing.assert_close(cosines, torch.ones_like(cosines), atol=1e-4, rtol=0)
    assert unpack_with_metadata(client.http.get("/v1/codec/int8").content)[0] == {}
    missing = client.http.get("/v1/codec/zip")
    assert missing.status_code == 404
    assert missing.json()["detail"] == (
        "no tap encoding 'zip'; the cloud offers raw-le, int8, lowrank64-int8, lowrank32-int8"
    )


# ---- auth isolation ----------------------------------------------------------------------------
def test_a_device_cannot_touch_another_devices_sessions(server, backbone):
    with device(server.url, "a") as a, device(server.url, "b") as b:
        finished = a.run(
            None, prompt=_prompt(backbone), setting="base", decoding={"max_new_tokens": 2}
        )
        live = a.open(prompt=_prompt(backbone), setting="full", deadline_s=30)
        for sid in (finished.session["session_id"], live["session_id"]):
            base = f"/v1/sessions/{sid}"
            attempts = {
                "read": b.http.get(base),
                "stream": b.http.get(f"{base}/events"),
                "answer": b.answer(sid, 1, torch.zeros(1, 64)),
                "cancel": b.http.post(f"{base}/cancel"),
            }
            for what, response in attempts.items():
                assert response.status_code in (403, 404), (what, response.text)
                assert "no session" in response.json()["detail"]
        listed = {s["session_id"] for s in b.http.get("/v1/sessions").json()}
        assert listed.isdisjoint({finished.session["session_id"], live["session_id"]})
        # A's live session is untouched and still A's to run
        assert a.http.get(f"/v1/sessions/{live['session_id']}").json()["status"] == "created"
        assert a.http.post(f"/v1/sessions/{live['session_id']}/cancel").status_code == 200


def test_tokens_are_stored_only_as_hashes(server, client):
    token = client.http.headers["authorization"].removeprefix("Bearer ")
    records = server.cloud.records
    assert records.device_by_token_hash(token) is None  # not stored in clear
    from cloud_api.auth import hash_token

    assert records.device_by_token_hash(hash_token(token)) is not None


# ---- bad input ----------------------------------------------------------------------------------
def _session(backbone: Backbone, **changes) -> dict:
    return {"prompt": _prompt(backbone), "setting": "full", "deadline_s": 5.0} | changes


def _gate(**changes) -> dict:
    return {"weight": [[0.0] * 64, [0.0] * 64], "bias": [0.0, 0.0]} | changes


def _typed(content: bytes, content_type: str) -> dict:
    return {"content": content, "headers": {"Content-Type": content_type}}


def _json_text(body: dict) -> dict:
    """JSON as Python writes it, NaN literals included (httpx's json= refuses NaN)."""
    return _typed(json.dumps(body).encode(), "application/json")


BAD_REQUESTS = [
    # (name, method, path, request kwargs (a callable of the backbone), status, message fragment)
    (
        "malformed JSON",
        "POST",
        "/v1/sessions",
        lambda b: _typed(b'{"prompt": ', "application/json"),
        400,
        "malformed JSON",
    ),
    (
        "body not an object",
        "POST",
        "/v1/sessions",
        lambda b: {"json": [1, 2]},
        422,
        "valid dictionary",
    ),
    (
        "unknown field",
        "POST",
        "/v1/sessions",
        lambda b: {"json": _session(b, colour="red")},
        422,
        "colour: Extra inputs are not permitted",
    ),
    (
        "no prompt",
        "POST",
        "/v1/sessions",
        lambda b: {"json": {"setting": "base"}},
        422,
        "prompt: Field required",
    ),
    (
        "unknown tap encoding",
        "POST",
        "/v1/sessions",
        lambda b: {"json": _session(b, tap_encoding="zip")},
        422,
        "tap_encoding: Input should be 'raw-le', 'int8', 'lowrank64-int8' or 'lowrank32-int8'",
    ),
    (
        "empty prompt",
        "POST",
        "/v1/sessions",
        lambda b: {"json": _session(b, prompt=[])},
        422,
        "at least 1 item",
    ),
    (
        "over-long prompt",
        "POST",
        "/v1/sessions",
        lambda b: {"json": _session(b, prompt=[5] * (MAX_PROMPT + 1))},
        413,
        f"the limit is {MAX_PROMPT}",
    ),
    (
        "token id outside the vocabulary",
        "POST",
        "/v1/sessions",
        lambda b: {"json": _session(b, prompt=[5, 259])},
        422,
        "outside the vocabulary",
    ),
    (
        "negative token id",
        "POST",
        "/v1/sessions",
        lambda b: {"json": _session(b, prompt=[5, -1])},
        422,
        "greater than or equal to 0",
    ),
    (
        "too many new tokens",
        "POST",
        "/v1/sessions",
        lambda b: {"json": _session(b, decoding={"max_new_tokens": MAX_NEW + 1})},
        422,
        "SPA_CLOUD_MAX_NEW_TOKENS",
    ),
    (
        "unknown setting",
        "POST",
        "/v1/sessions",
        lambda b: {"json": _session(b, setting="magic")},
        422,
        "setting: Input should be 'base', 'lst', 'full', 'choice', 'spa'",
    ),
    (
        "lora is in-process only",
        "POST",
        "/v1/sessions",
        lambda b: {"json": _session(b, setting="lora")},
        422,
        "in-process baseline",
    ),
    (
        "negative no-repeat n-gram size",
        "POST",
        "/v1/sessions",
        lambda b: {"json": _session(b, decoding={"no_repeat_ngram_size": -1})},
        422,
        "decoding.no_repeat_ngram_size: Input should be greater than or equal to 0",
    ),
    (
        "zero repetition penalty",
        "POST",
        "/v1/sessions",
        lambda b: {"json": _session(b, decoding={"repetition_penalty": 0})},
        422,
        "decoding.repetition_penalty: Input should be greater than 0",
    ),
    (
        "too many beams",
        "POST",
        "/v1/sessions",
        lambda b: {"json": _session(b, decoding={"strategy": "beam", "num_beams": 9})},
        422,
        "less than or equal to 8",
    ),
    (
        "beam search in strict mode",
        "POST",
        "/v1/sessions",
        lambda b: {"json": _session(b, setting="spa", strict=True, decoding={"strategy": "beam"})},
        422,
        "with beam search use the gate",
    ),
    (
        "gated setting without a gate",
        "POST",
        "/v1/sessions",
        lambda b: {"json": _session(b, setting="spa")},
        422,
        "needs the device's gate weights",
    ),
    (
        "gate of the wrong shape",
        "POST",
        "/v1/sessions",
        lambda b: {"json": _session(b, setting="spa", gate=_gate(weight=[[0.0] * 63] * 2))},
        422,
        "gate.weight must have shape [2, 64]",
    ),
    (
        "NaN in the gate",
        "POST",
        "/v1/sessions",
        lambda b: _json_text(_session(b, setting="spa", gate=_gate(bias=[float("nan"), 0.0]))),
        422,
        "finite number",
    ),
    (
        "gate in bad base64",
        "POST",
        "/v1/sessions",
        lambda b: {"json": _session(b, setting="spa", gate=_gate(weight="!!notbase64"))},
        422,
        "gate.weight: not valid base64",
    ),
    (
        "gate base64 of the wrong size",
        "POST",
        "/v1/sessions",
        lambda b: {"json": _session(b, setting="spa", gate=_gate(weight="AAAA"))},
        422,
        "expected 128 float32 values",
    ),
    (
        "rung outside 1..L",
        "POST",
        "/v1/sessions",
        lambda b: {"json": _session(b, rungs=[3])},
        422,
        "must lie in 1..2",
    ),
    (
        "rungs not increasing",
        "POST",
        "/v1/sessions",
        lambda b: {"json": _session(b, rungs=[2, 1])},
        422,
        "strictly increasing",
    ),
    (
        "deadline over the limit",
        "POST",
        "/v1/sessions",
        lambda b: {"json": _session(b, deadline_s=31)},
        422,
        "SPA_CLOUD_MAX_DEADLINE_S",
    ),
    (
        "unknown tap dtype",
        "POST",
        "/v1/sessions",
        lambda b: {"json": _session(b, tap_dtype="int8")},
        422,
        "tap_dtype",
    ),
    (
        "oversized body",
        "POST",
        "/v1/sessions",
        lambda b: {"json": _session(b, prompt="x" * MAX_BODY)},
        413,
        "SPA_CLOUD_MAX_BODY_BYTES",
    ),
    ("unknown session", "GET", "/v1/sessions/nope", lambda b: {}, 404, "no session nope"),
    (
        "events of an unknown session",
        "GET",
        "/v1/sessions/nope/events",
        lambda b: {},
        404,
        "no session nope",
    ),
    (
        "answer to an unknown session",
        "POST",
        "/v1/sessions/nope/side-requests/1/answer",
        lambda b: {"content": b"\0" * 128, "headers": {"Content-Type": "application/octet-stream"}},
        404,
        "no session nope",
    ),
    (
        "cancel an unknown session",
        "POST",
        "/v1/sessions/nope/cancel",
        lambda b: {},
        404,
        "no session nope",
    ),
    (
        "features: too many examples",
        "POST",
        "/v1/features",
        lambda b: {"json": {"examples": [{"prompt": [5], "target": [6]}] * (MAX_BATCH + 1)}},
        413,
        "SPA_CLOUD_FEATURES_MAX_BATCH",
    ),
    (
        "features: too long",
        "POST",
        "/v1/features",
        lambda b: {"json": {"examples": [{"prompt": [5] * MAX_TOKENS, "target": [6]}]}},
        413,
        "SPA_CLOUD_FEATURES_MAX_TOKENS",
    ),
    (
        "features: no target",
        "POST",
        "/v1/features",
        lambda b: {"json": {"examples": [{"prompt": [5]}]}},
        422,
        "target: Field required",
    ),
    (
        "features: no examples",
        "POST",
        "/v1/features",
        lambda b: {"json": {"examples": []}},
        422,
        "at least 1 item",
    ),
    (
        "features: bad rungs",
        "POST",
        "/v1/features",
        lambda b: {"json": {"examples": [{"prompt": "a", "target": "b"}], "rungs": [0]}},
        422,
        "must lie in 1..2",
    ),
    ("head: unknown dtype", "GET", "/v1/head?dtype=int4", lambda b: {}, 422, "query.dtype"),
    (
        "device name too long",
        "POST",
        "/v1/devices",
        lambda b: {"json": {"name": "n" * 101}},
        422,
        "at most 100 characters",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "make", "status", "message"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests_get_a_clear_4xx(client, backbone, method, path, make, status, message):
    response = client.http.request(method, path, **make(backbone))
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["detail"]


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing bearer token"),
        ({"Authorization": "Bearer spa_not-a-token"}, "unknown or revoked bearer token"),
        ({"Authorization": "Basic dXNlcjpwdw=="}, "missing bearer token"),
    ],
    ids=["missing token", "wrong token", "not a bearer token"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/info"), ("POST", "/v1/sessions"), ("GET", "/v1/sessions/x/events")],
)
def test_missing_or_wrong_tokens_get_401(server, headers, message, method, path):
    response = httpx.request(method, f"{server.url}{path}", headers=headers, json={})
    assert response.status_code == 401
    assert message in response.json()["detail"]
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.fixture
def waiting(server, client, backbone):
    """A session whose first side request is waiting for the device's answer."""
    session = client.open(**_session(backbone, deadline_s=30.0))
    events = client.events(session["session_id"])
    request = next(e for e in events if e["event"] == "side_request")
    yield session["session_id"], request
    client.http.post(f"/v1/sessions/{session['session_id']}/cancel")
    list(events)


def _raw(values: torch.Tensor, dtype=torch.float16) -> dict:
    data = values.to(dtype).contiguous().view(torch.uint8).numpy().tobytes()
    return {"content": data, "headers": {"Content-Type": "application/octet-stream"}}


def _nan() -> torch.Tensor:
    g = torch.zeros(64)
    g[3] = float("nan")
    return g


BAD_ANSWERS = [
    (
        "wrong shape",
        lambda rid: (rid, _raw(torch.zeros(65))),
        422,
        "expected 64 float16 values of shape [1, 64] (128 bytes), got 130 bytes",
    ),
    (
        "wrong dtype",
        lambda rid: (
            rid,
            _raw(torch.zeros(64), torch.float32)
            | {"headers": {"Content-Type": "application/octet-stream", "X-SPA-Dtype": "float32"}},
        ),
        422,
        "g must be float16 (the session's tap dtype), got float32",
    ),
    (
        "fp32 bytes sent as fp16",
        lambda rid: (rid, _raw(torch.zeros(64), torch.float32)),
        422,
        "got 256 bytes",
    ),
    ("NaN", lambda rid: (rid, _raw(_nan())), 422, "NaN or infinite"),
    ("Inf", lambda rid: (rid, _raw(torch.full((64,), float("inf")))), 422, "NaN or infinite"),
    (
        "JSON with bad base64",
        lambda rid: (rid, {"json": {"g": "@@@", "dtype": "float16"}}),
        422,
        "not valid base64",
    ),
    ("malformed JSON", lambda rid: (rid, _typed(b"{", "application/json")), 400, "malformed JSON"),
    (
        "unsupported content type",
        lambda rid: (rid, _typed(b"x", "text/plain")),
        415,
        "application/octet-stream",
    ),
    (
        "request never made",
        lambda rid: (rid + 41, _raw(torch.zeros(64))),
        404,
        "was never made in session",
    ),
    (
        "request id not a number",
        lambda rid: ("first", _raw(torch.zeros(64))),
        422,
        "path.request_id",
    ),
]


@pytest.mark.parametrize(
    ("make", "status", "message"), [c[1:] for c in BAD_ANSWERS], ids=[c[0] for c in BAD_ANSWERS]
)
def test_bad_answers_get_a_clear_4xx(client, waiting, make, status, message):
    sid, request = waiting
    rid, kwargs = make(request["request_id"])
    response = client.http.post(f"/v1/sessions/{sid}/side-requests/{rid}/answer", **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_a_request_is_answered_once(client, waiting):
    sid, request = waiting
    url = f"/v1/sessions/{sid}/side-requests/{request['request_id']}/answer"
    g = base64.b64encode(bytes(128)).decode()  # JSON form: base64 of 64 fp16 zeros
    first = client.http.post(url, json={"g": g, "dtype": "float16"})
    second = client.http.post(url, json={"g": g, "dtype": "float16"})
    assert first.status_code == 200 and first.json()["accepted"] is True
    assert second.status_code == 409 and "already answered" in second.json()["detail"]


def test_the_server_keeps_serving_after_bad_input(server, backbone):
    with device(server.url, "after") as client:
        run = client.run(
            None, prompt=_prompt(backbone), setting="base", decoding={"max_new_tokens": 3}
        )
    assert run.done["status"] == "finished" and len(run.tokens) == 3
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_taps_decode_with_the_documented_encoding(client, backbone):
    """A side request's taps are the raw fp16 residual stream at the rungs, position by position."""
    body = _session(backbone, rungs=[1, 2], decoding={"max_new_tokens": 1}, tap_encoding="raw-le")
    session = client.open(**body)
    events = client.events(session["session_id"])
    request = next(e for e in events if e["event"] == "side_request")
    client.http.post(f"/v1/sessions/{session['session_id']}/cancel")
    list(events)
    taps = from_raw(base64.b64decode(request["taps"]), request["dtype"], request["shape"])
    want = backbone(torch.tensor([_prompt(backbone)]), rungs=(1, 2), logits=None).taps[0]
    assert request["shape"] == [len(_prompt(backbone)), 2, 64] and request["encoding"] == "raw-le"
    assert torch.equal(taps, want.half())
