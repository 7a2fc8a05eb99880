"""Run-ahead sessions against a real uvicorn server (tiny backbone) and an httpx device: greedy
output equals synchronous `spa`, a device that never corrects gets `base`, a silent device never
stalls the cloud, sampling follows the speculative rule, rollback equals a fresh computation, and
the gate never crosses the wire."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from cloud_server import running

from device_agent.client import CloudClient
from device_agent.generation import RemoteGeneration
from personalization.backbone.frozen import Backbone
from personalization.backbone.tiny import tiny_backbone
from personalization.config import DecodeConfig, SPAConfig
from personalization.decoding import generate
from personalization.model import SPAModel
from personalization.run_ahead import Drafter, accept_or_resample

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running(tmp_path_factory.mktemp("cloud")) as server:
        yield server


@pytest.fixture(scope="module")
def token(server) -> str:
    return httpx.post(f"{server.url}/v1/devices", json={"name": "run-ahead"}).json()["token"]


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return tiny_backbone("llama")  # the weights the server loads (tiny backbones are seeded)


def _model(backbone: Backbone, threshold: float | None = None, **config) -> SPAModel:
    """A side network whose g(x) moves tokens, and a gate that fires on some of them; f(x)
    travels in float32 so the device decides on exactly the f the cloud's own gate would see."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = SPAModel(backbone, SPAConfig(wire_dtype="float32", **config))
        torch.nn.init.normal_(model.side.up.weight, std=0.5)
        torch.nn.init.normal_(model.gate.linear.weight, std=1.0)
    if threshold is None:  # the median p(device) over a base run: the gate fires about half
        ids = torch.tensor([_prompt(backbone) + list(range(40, 60))])
        f = backbone(ids, logits=None).hidden[0]
        threshold = float(model.gate_prob(f).detach().median())
    model.config = SPAConfig(wire_dtype="float32", threshold=threshold, **config)
    return model.eval()


def _prompt(backbone: Backbone) -> list[int]:
    return backbone.encode_prompt("summarise: the quick brown fox jumps over the lazy dog")


def _remote(server, token, model, decode, **kwargs) -> RemoteGeneration:
    client = CloudClient(server.url, token)
    return RemoteGeneration(
        client, model, _prompt(model.backbone), "spa", decode, tap_mode="run-ahead", **kwargs
    )


@pytest.mark.parametrize("encoding", ["raw-le", "lowrank32-int8"])
def test_greedy_run_ahead_gives_the_tokens_of_synchronous_spa(server, token, backbone, encoding):
    model = _model(backbone, tap_encoding=encoding)
    decode = DecodeConfig(max_new_tokens=NEW_TOKENS)
    want = list(generate(model, _prompt(backbone), decode))  # synchronous spa, in-process
    remote = _remote(server, token, model, decode)
    got = list(remote)
    assert [t.id for t in got] == [t.id for t in want]
    branches = ["device" if t.branch == "correction" else t.branch for t in got]
    assert branches == [t.branch for t in want] and "device" in branches
    for mine, theirs in zip(got, want, strict=True):
        assert mine.gate_prob == pytest.approx(theirs.gate_prob, abs=1e-5)
    a = remote.accounts
    assert remote.status == "finished" and a.corrections >= 1
    assert a.corrections == sum(t.branch == "correction" for t in got)
    assert a.withdrawn >= 0 and a.t_total == pytest.approx(sum(t.total_s for t in got))
    record = remote.client.session_record(remote.session.session_id)
    assert record.tokens == len(got) and record.device_contacts == a.contacts


def test_run_ahead_applies_the_repetition_controls_as_synchronous_spa(server, token, backbone):
    """The drafts and the device's verdicts both see the prompt and the tokens before them (the
    prompt's ids come with `start`), so the output is synchronous spa's with the same controls."""
    model = _model(backbone)
    decode = DecodeConfig(max_new_tokens=NEW_TOKENS, repetition_penalty=1.4, no_repeat_ngram_size=2)
    want = [t.id for t in generate(model, _prompt(backbone), decode)]
    assert want != [
        t.id for t in generate(model, _prompt(backbone), DecodeConfig(max_new_tokens=NEW_TOKENS))
    ]
    remote = _remote(server, token, model, decode)
    assert [t.id for t in remote] == want and remote.status == "finished"


def test_a_device_that_never_corrects_gets_base(server, token, backbone):
    model = _model(backbone, threshold=1.01)  # σ is never 1
    decode = DecodeConfig(max_new_tokens=NEW_TOKENS)
    base = SPAModel(backbone, SPAConfig(setting="base"))
    want = [t.id for t in generate(base, _prompt(backbone), decode)]
    remote = _remote(server, token, model, decode)
    got = list(remote)
    assert [t.id for t in got] == want and {t.branch for t in got} == {"cloud"}
    assert remote.accounts.corrections == 0 and remote.accounts.contacts == 1  # the last verdict


def _run_ahead_body(backbone, *, deadline_s: float, tokens: int) -> dict:
    """A run-ahead session request, as a device without gate weights sends it."""
    return {
        "prompt": _prompt(backbone),
        "setting": "spa",
        "tap_mode": "run-ahead",
        "rungs": list(_model(backbone).rungs),
        "deadline_s": deadline_s,
        "decoding": {"max_new_tokens": tokens},
    }


def test_a_silent_device_never_stalls_the_cloud(server, token, backbone):
    """A device that reads the drafts and never answers: the cloud drafts every token without
    waiting, then waits one deadline for the last verdict and ends, drafts unverified."""
    body = _run_ahead_body(backbone, deadline_s=0.5, tokens=NEW_TOKENS) | {"tap_dtype": "float32"}
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
        sid = http.post("/v1/sessions", json=body).json()["session_id"]
        events = [json.loads(line) for line in http.get(f"/v1/sessions/{sid}/events").iter_lines()]
        late = http.post(f"/v1/sessions/{sid}/verdicts", json={"epoch": 0, "index": 0, "token": 1})
    drafts = [e for e in events if e["event"] == "draft"]
    done = events[-1]
    base = SPAModel(backbone, SPAConfig(setting="base"))
    decode = DecodeConfig(max_new_tokens=NEW_TOKENS)
    want = [t.id for t in generate(base, _prompt(backbone), decode)]
    assert [d["id"] for d in drafts] == want and drafts[-1]["last"]
    assert done["status"] == "finished" and done["run_ahead"]["verified"] is False
    assert "no verdict" in done["reason"] and done["run_ahead"]["corrections"] == 0
    assert late.status_code == 409 and "has ended" in late.json()["detail"]


def test_stale_and_malformed_verdicts_are_refused(server, token, backbone):
    body = _run_ahead_body(backbone, deadline_s=5.0, tokens=4)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
        gate = {"weight": [[0.0] * 64] * 2, "bias": [0.0, 0.0]}
        with_gate = http.post("/v1/sessions", json=body | {"gate": gate})
        beam = http.post("/v1/sessions", json=body | {"decoding": {"strategy": "beam"}})
        sid = http.post("/v1/sessions", json=body).json()["session_id"]
        with http.stream("GET", f"/v1/sessions/{sid}/events") as stream:
            lines = stream.iter_lines()
            first = next(e for e in map(json.loads, lines) if e["event"] == "draft")
            stale = http.post(f"/v1/sessions/{sid}/verdicts", json={"epoch": 3, "index": 0})
            ahead = http.post(f"/v1/sessions/{sid}/verdicts", json={"epoch": 0, "index": 99})
            vocab = http.post(
                f"/v1/sessions/{sid}/verdicts", json={"epoch": 0, "index": 0, "token": 10**9}
            )
            http.post(f"/v1/sessions/{sid}/cancel")
    assert with_gate.status_code == 422 and "no gate weights" in with_gate.json()["detail"]
    assert beam.status_code == 422 and "beam search stays synchronous" in beam.json()["detail"]
    assert first["index"] == 0 and first["epoch"] == 0
    assert stale.status_code == 409 and "superseded" in stale.json()["detail"]
    assert ahead.status_code == 422 and "no draft 99" in ahead.json()["detail"]
    assert vocab.status_code == 422


def test_seeded_sampling_is_reproducible_and_corrects(server, token, backbone):
    model = _model(backbone)
    decode = DecodeConfig(strategy="sample", temperature=1.0, seed=11, max_new_tokens=NEW_TOKENS)
    runs = [[(t.id, t.branch) for t in _remote(server, token, model, decode)] for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) > 0


def test_the_speculative_rule_samples_from_the_target_distribution():
    """Drafts drawn from q, kept with probability min(1, p/q), else drawn from the residual:
    the outputs are distributed as p (many seeded trials; p and q far apart)."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(12, generator=g), -1)
    q = torch.softmax(3 * torch.randn(12, generator=g), -1)
    rng, n = torch.Generator().manual_seed(1), 20000
    counts = torch.zeros(12)
    for _ in range(n):
        draft = int(torch.multinomial(q, 1, generator=rng))
        counts[accept_or_resample(p, q, draft, rng)] += 1
    tv = 0.5 * float((counts / n - p).abs().sum())
    assert 0.5 * float((p - q).abs().sum()) > 0.4  # the draft distribution is far from p
    assert tv < 0.02, tv


def test_rollback_leaves_the_cache_equal_to_a_fresh_computation(backbone):
    model = _model(backbone)
    decode = DecodeConfig(max_new_tokens=12)
    drafter = Drafter(model, _prompt(backbone), decode)
    for _ in range(6):
        drafter.step()
    assert drafter.correct(2, 17) == 3  # drafts 3, 4, 5 withdrawn
    after = drafter.step()  # draft 3 continues from the device's token
    fresh = Drafter(model, _prompt(backbone) + drafter.tokens[:3], decode)
    again = fresh.step()
    assert drafter.tokens[:3] == drafter.tokens[:2] + [17] and after.token == again.token
    assert drafter.length == fresh.length
    for mine, theirs in zip(drafter.cache.layers, fresh.cache.layers, strict=True):
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.values, theirs.values, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(after.f, again.f, atol=1e-5, rtol=1e-4)
