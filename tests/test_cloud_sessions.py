"""Generation sessions over HTTP against a real uvicorn server (tiny backbone): the tokens and
branch labels equal in-process decoding; a silent device degrades to fallback, never hangs;
sessions run side by side; cancel, time-to-live and the session cap."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import httpx
import pytest
import torch
from cloud_server import running

from benchmarks.bare_device import CloudClient, SideDevice, device
from personalization.backbone.frozen import Backbone
from personalization.backbone.tiny import tiny_backbone
from personalization.config import DecodeConfig, SideConfig, SPAConfig
from personalization.decoding import Token, generate
from personalization.model import Ask, SPAModel
from personalization.side import SideNetwork

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running(tmp_path_factory.mktemp("cloud"), max_sessions=4) as server:
        yield server


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    """The same weights the server loads (tiny backbones are seeded), held by the test."""
    return tiny_backbone("llama")


@pytest.fixture(scope="module")
def side(backbone: Backbone) -> SideNetwork:
    """A side network whose g(x) is far from zero, so the device changes tokens."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        side = SideNetwork(
            SideConfig(hidden_size=backbone.hidden_size, num_layers=backbone.num_layers)
        )
        torch.nn.init.normal_(side.up.weight, std=0.5)
    return side.eval()


@pytest.fixture(scope="module")
def gate(backbone: Backbone) -> dict:
    """Gate weights and a threshold at the median p(device) of a base run: it fires on some
    tokens but not all."""
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(2, backbone.hidden_size, generator=g), torch.zeros(2)
    ids = torch.tensor([_prompt(backbone) + list(range(40, 60))])
    f = backbone(ids, logits=None).hidden[0]
    p = torch.softmax(backbone.final_norm(f) @ weight.T + bias, -1)[:, 1]
    return {"weight": weight.tolist(), "bias": bias.tolist(), "threshold": float(p.median())}


def _prompt(backbone: Backbone) -> list[int]:
    return backbone.encode_prompt("summarise: the quick brown fox jumps over the lazy dog")


class Missing:
    """The in-process twin of a device that misses some side requests (1-based numbers)."""

    def __init__(self, model: SPAModel, missed: set[int]):
        self.model, self.missed, self.calls = model, missed, 0
        self.cache = model.side.new_cache()

    def __call__(self, ask: Ask) -> torch.Tensor | None:
        self.calls += 1
        if self.calls in self.missed:
            return None
        return self.model.wire(self.model.side(ask.taps, self.cache)[:, -1])


def reference(backbone, side, gate, setting, decode, *, strict=False, missed=()) -> list[Token]:
    """In-process decoding with the same side network, gate and settings."""
    threshold = 0.0 if strict else gate["threshold"]
    cfg = SPAConfig(setting=setting, threshold=threshold, tap_encoding="raw-le")  # as session_body
    model = SPAModel(backbone, cfg, side.config)
    model.side.load_state_dict(side.state_dict())
    with torch.no_grad():
        model.gate.linear.weight.copy_(torch.tensor(gate["weight"]))
        model.gate.linear.bias.copy_(torch.tensor(gate["bias"]))
    device = Missing(model, set(missed)) if missed else None
    return list(generate(model, _prompt(backbone), decode, device=device))


def session_body(backbone, gate, setting, *, strict=False, strategy="greedy", seed=None, **extra):
    body = {
        "prompt": _prompt(backbone),
        "setting": setting,
        "decoding": {"strategy": strategy, "max_new_tokens": NEW_TOKENS, "seed": seed},
        "deadline_s": 20.0,
        "tap_encoding": "raw-le",  # the test device (cloud_client.SideDevice) reads raw taps
    } | extra
    if strict:
        body["strict"] = True
    else:
        body |= {"gate": {"weight": gate["weight"], "bias": gate["bias"]}}
        body["threshold"] = gate["threshold"]
    return body


@pytest.mark.parametrize(
    ("setting", "strict", "strategy"),
    [
        ("spa", False, "greedy"),
        ("choice", False, "greedy"),
        ("full", False, "greedy"),
        ("lst", False, "greedy"),
        ("base", False, "greedy"),
        ("spa", True, "greedy"),
        ("spa", False, "sample"),
    ],
)
def test_http_session_equals_in_process_decoding(
    server, backbone, side, gate, setting, strict, strategy
):
    seed = 7 if strategy == "sample" else None
    decode = DecodeConfig(strategy=strategy, max_new_tokens=NEW_TOKENS, temperature=1.0, seed=seed)
    expected = reference(backbone, side, gate, setting, decode, strict=strict)
    body = session_body(backbone, gate, setting, strict=strict, strategy=strategy, seed=seed)
    with device(server.url) as client:
        run = client.run(SideDevice(side), **body)
    assert run.ids == [t.id for t in expected]
    assert run.branches == [t.branch for t in expected]
    if setting in ("spa", "choice") and not strict:
        assert {"cloud", "device"} <= set(run.branches), "the gate should fire on some tokens"
        for got, want in zip(run.tokens, expected, strict=True):
            assert got["gate_prob"] == pytest.approx(want.gate_prob, abs=1e-6)
    assert "".join(t["text"] for t in run.tokens) == "".join(t.text for t in expected)
    totals = run.done["totals"]
    assert run.done["status"] == "finished"
    assert totals["tokens"] == len(expected)
    assert (
        totals["device_contacts"]
        == len(run.side_requests)
        == sum(b == "device" for b in run.branches)
    )
    assert totals["bytes_to_device"] == sum(t["bytes_to_device"] for t in run.tokens)
    assert (totals["bytes_to_device"] > 0) == (setting != "base")
    # each side request carries exactly the positions the device has not seen, in one message
    starts = [r["start"] for r in run.side_requests]
    ends = [r["start"] + r["positions"] for r in run.side_requests]
    assert starts == ([0] + ends[:-1] if starts else [])


@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_repetition_controls_over_http_equal_in_process(server, backbone, side, gate, strategy):
    controls = {"repetition_penalty": 1.4, "no_repeat_ngram_size": 2}
    seed = 7 if strategy == "sample" else None
    decode = DecodeConfig(strategy=strategy, max_new_tokens=NEW_TOKENS, seed=seed, **controls)
    expected = reference(backbone, side, gate, "spa", decode)
    plain = reference(
        backbone, side, gate, "spa", replace(decode, repetition_penalty=1.0, no_repeat_ngram_size=0)
    )
    if strategy == "greedy":  # the controls change the output (a sample may not hit a repeat)
        assert [t.id for t in expected] != [t.id for t in plain]
    body = session_body(backbone, gate, "spa", strategy=strategy, seed=seed)
    body["decoding"] |= controls
    with device(server.url) as client:
        run = client.run(SideDevice(side), **body)
    assert run.ids == [t.id for t in expected]
    assert run.branches == [t.branch for t in expected]


def test_a_silent_device_gets_fallback_tokens_within_the_deadlines(server, backbone, side, gate):
    deadline, n = 0.25, 6
    base = reference(backbone, side, gate, "base", DecodeConfig(max_new_tokens=n))
    body = session_body(backbone, gate, "spa", strict=True, deadline_s=deadline)
    body["decoding"]["max_new_tokens"] = n
    start = time.monotonic()
    with device(server.url) as client:
        run = client.run(SideDevice(side), respond=lambda _: "ignore", **body)
        record = client.http.get(f"/v1/sessions/{run.session['session_id']}").json()
    elapsed = time.monotonic() - start
    assert run.ids == [t.id for t in base]  # the backbone's own tokens
    assert run.branches == ["fallback"] * len(base)
    assert elapsed < len(base) * deadline + 15  # liveness: bounded by the deadlines (+ slack)
    assert all(t["device_wait_ms"] >= 1e3 * deadline * 0.9 for t in run.tokens)
    # nothing was confirmed, so every request re-sends everything from position 0
    prompt = len(_prompt(backbone))
    assert [(r["start"], r["positions"]) for r in run.side_requests] == [
        (0, prompt + i) for i in range(len(base))
    ]
    assert record["status"] == "finished"
    assert record["fallbacks"] == record["device_contacts"] == len(base)
    assert record["device_tokens"] == 0 and record["tokens"] == len(base)


def test_late_and_missed_answers_fall_back_and_the_device_catches_up(server, backbone, side, gate):
    """A device that answers request 1 after its deadline and ignores request 3: those tokens
    fall back, the next requests re-send the unseen taps, and the rest equals in-process
    decoding with the same requests missed."""
    missed = {1, 3}
    decode = DecodeConfig(max_new_tokens=NEW_TOKENS)
    expected = reference(backbone, side, gate, "full", decode, missed=missed)
    body = session_body(backbone, gate, "full", deadline_s=0.5)

    def respond(event):
        return {1: "late", 3: "ignore"}.get(event["request_id"], "answer")

    with device(server.url) as client:
        run = client.run(SideDevice(side), respond=respond, **body)
    assert run.ids == [t.id for t in expected]
    assert run.branches == [t.branch for t in expected]
    assert run.branches[:4] == ["fallback", "device", "fallback", "device"]
    assert [r.status_code for r in run.late_answers] == [409]
    assert "expired" in run.late_answers[0].json()["detail"]
    requests = run.side_requests
    assert requests[1]["start"] == 0 and requests[2]["start"] == requests[1]["positions"]
    assert requests[3]["start"] == requests[2]["start"]  # request 3 was missed: re-sent
    assert run.done["totals"]["fallbacks"] == 2


def test_two_devices_generate_at_the_same_time(server, backbone, side, gate):
    jobs = {"a": ("spa", False), "b": ("full", False)}
    expected = {
        name: reference(backbone, side, gate, setting, DecodeConfig(max_new_tokens=NEW_TOKENS))
        for name, (setting, _) in jobs.items()
    }
    runs, failures = {}, []
    barrier = threading.Barrier(len(jobs))

    def work(name: str, setting: str) -> None:
        try:
            with device(server.url, name) as client:
                barrier.wait(timeout=30)
                runs[name] = client.run(SideDevice(side), **session_body(backbone, gate, setting))
        except Exception as exc:  # reported below, with the thread's name
            failures.append((name, exc))

    threads = [threading.Thread(target=work, args=(n, s)) for n, (s, _) in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures
    for name in jobs:
        assert runs[name].ids == [t.id for t in expected[name]]
        assert runs[name].branches == [t.branch for t in expected[name]]


def test_sixteen_mixed_sessions_share_passes_and_each_equals_itself_alone(
    tmp_path, backbone, side, gate
):
    """16 devices at once — every setting; greedy, seeded sampling and beam search; different
    lengths — each get exactly the tokens, branches and gate probabilities of in-process
    decoding alone, while the step scheduler batches their passes (/metrics says so)."""
    from prometheus_client.parser import text_string_to_metric_families

    kinds = [
        (setting, strategy)
        for strategy in ("greedy", "sample")
        for setting in ("spa", "full", "choice", "lst", "base", "spa")
    ] + [("base", "beam")] * 4  # beams are rows of one pass (this test device answers one row)
    jobs = {}
    for i, (setting, strategy) in enumerate(kinds):
        decode = DecodeConfig(
            strategy=strategy,
            max_new_tokens=6 + i % 7,
            temperature=1.0,
            seed=100 + i if strategy == "sample" else None,
            num_beams=2 + i % 2,
        )
        body = session_body(backbone, gate, setting, strategy=strategy, seed=decode.seed)
        body["decoding"] |= {"max_new_tokens": decode.max_new_tokens, "num_beams": decode.num_beams}
        jobs[f"d{i}"] = (setting, decode, body)
    runs, failures = {}, []
    barrier = threading.Barrier(len(jobs))

    def work(name: str) -> None:
        try:
            with device(short.url, name) as client:
                barrier.wait(timeout=60)
                runs[name] = client.run(SideDevice(side), **jobs[name][2])
        except Exception as exc:  # reported below, with the thread's name
            failures.append((name, exc))

    with running(tmp_path, max_sessions=16, max_batch=8) as short:
        threads = [threading.Thread(target=work, args=(name,)) for name in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        text = httpx.get(f"{short.url}/metrics").text
    assert not failures, failures
    for name, (setting, decode, _) in jobs.items():
        want = reference(backbone, side, gate, setting, decode)
        got = runs[name]
        assert got.ids == [t.id for t in want], (name, setting, decode.strategy)
        assert got.branches == [t.branch for t in want], name
        for mine, theirs in zip(got.tokens, want, strict=True):
            if theirs.gate_prob is not None:
                assert mine["gate_prob"] == pytest.approx(theirs.gate_prob, abs=1e-5)
    metrics = {
        s.name + s.labels.get("le", ""): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    passes, rows = metrics["spa_scheduler_passes_total"], metrics["spa_scheduler_sequences_total"]
    assert rows > passes > 0  # passes were shared
    assert metrics["spa_scheduler_batch_rows_bucket1"] < metrics["spa_scheduler_batch_rows_count"]
    assert metrics["spa_scheduler_batch_rows_bucket+Inf"] == passes
    assert metrics["spa_sessions_live"] == 0 and metrics["spa_sessions_limit"] == 16
    assert metrics["process_resident_memory_bytes"] > 50e6  # what the soak benchmark reads


def test_a_waiting_device_does_not_hold_up_other_sessions(server, backbone, side, gate):
    """While device A sits on a side request, device B's whole session runs to the end."""
    body_a = session_body(backbone, gate, "spa", strict=True, deadline_s=60.0)
    with device(server.url, "a") as a, device(server.url, "b") as b:
        session = a.open(**body_a)
        events = a.events(session["session_id"])
        first = next(e for e in events if e["event"] == "side_request")
        run_b = b.run(None, **session_body(backbone, gate, "base"))
        assert run_b.done["status"] == "finished" and len(run_b.tokens) == NEW_TOKENS
        state = a.http.get(f"/v1/sessions/{session['session_id']}").json()
        assert state["status"] == "running" and state["tokens"] == 0
        g = SideDevice(side).g(first)
        assert a.answer(session["session_id"], first["request_id"], g).status_code == 200
        a.http.post(f"/v1/sessions/{session['session_id']}/cancel")
        rest = list(events)
    assert rest[0]["event"] == "token" and rest[0]["branch"] == "device"
    assert rest[-1]["event"] == "done" and rest[-1]["status"] == "cancelled"


def test_cancel_ends_the_stream_and_refuses_later_answers(server, backbone, side, gate):
    body = session_body(backbone, gate, "spa", strict=True, deadline_s=60.0)
    with device(server.url) as client:
        session = client.open(**body)
        sid = session["session_id"]
        events = client.events(sid)
        request = next(e for e in events if e["event"] == "side_request")
        cancelled = client.http.post(f"/v1/sessions/{sid}/cancel")
        rest = list(events)
        late = client.answer(sid, request["request_id"], torch.zeros(1, backbone.hidden_size))
        again = client.http.post(f"/v1/sessions/{sid}/cancel")
        record = client.http.get(f"/v1/sessions/{sid}").json()
    assert cancelled.status_code == 200
    assert rest[-1]["event"] == "done" and rest[-1]["status"] == "cancelled"
    assert late.status_code == 409 and "cancelled" in late.json()["detail"]
    assert again.status_code == 409 and "has ended" in again.json()["detail"]
    assert record["status"] == "cancelled" and record["finished_at"] is not None


def test_a_device_that_leaves_without_resuming_is_cancelled_after_resume_s(
    tmp_path, backbone, gate
):
    """Closing the stream pauses the session (a plain second stream is refused with how to
    resume); nobody resumes it, so the sweep cancels it after resume_s, even mid side request."""
    body = session_body(backbone, gate, "spa", strict=True, deadline_s=60.0)
    with (
        running(tmp_path, resume_s=0.5, sweep_interval_s=0.1) as short,
        device(short.url) as client,
    ):
        sid = client.open(**body)["session_id"]
        events = client.events(sid)
        next(e for e in events if e["event"] == "side_request")
        again = client.http.get(f"/v1/sessions/{sid}/events")
        events.close()  # the device goes away mid-session
        status = _wait_for_status(client, sid, {"cancelled"})
        record = client.http.get(f"/v1/sessions/{sid}").json()
    assert again.status_code == 409 and "?after=" in again.json()["detail"]
    assert status == "cancelled" and "did not resume it within 0.5 s" in record["reason"]


def test_events_stream_once(server, backbone, gate):
    with device(server.url) as client:
        run = client.run(None, **session_body(backbone, gate, "base"))
        sid = run.session["session_id"]
        again = client.http.get(f"/v1/sessions/{sid}/events")
    assert again.status_code == 409 and "has ended (finished)" in again.json()["detail"]


def test_the_session_cap_answers_429_until_one_ends(server, backbone, gate):
    cap = server.settings.max_sessions
    with device(server.url) as client:
        opened = [client.open(**session_body(backbone, gate, "base")) for _ in range(cap)]
        refused = client.http.post("/v1/sessions", json=session_body(backbone, gate, "base"))
        client.http.post(f"/v1/sessions/{opened[0]['session_id']}/cancel")
        admitted = client.http.post("/v1/sessions", json=session_body(backbone, gate, "base"))
        for session in opened[1:] + [admitted.json()]:
            client.http.post(f"/v1/sessions/{session['session_id']}/cancel")
    assert refused.status_code == 429 and "the limit is 4" in refused.json()["detail"]
    assert refused.headers["retry-after"] == "1"
    assert admitted.status_code == 201


def test_idle_sessions_expire_after_their_time_to_live(tmp_path, backbone, gate):
    with (
        running(tmp_path, session_ttl_s=0.3, sweep_interval_s=0.1) as short,
        device(short.url) as client,
    ):
        sid = client.open(**session_body(backbone, gate, "base"))["session_id"]
        status = _wait_for_status(client, sid, {"expired"})
        stream = client.http.get(f"/v1/sessions/{sid}/events")
        record = client.http.get(f"/v1/sessions/{sid}").json()
    assert status == "expired" and "idle for more than" in record["reason"]
    assert stream.status_code == 409


def _wait_for_status(client: CloudClient, sid: str, wanted: set[str], timeout=20.0) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = client.http.get(f"/v1/sessions/{sid}").json()["status"]
        if status in wanted:
            break
        time.sleep(0.05)
    return status


def test_a_named_replica_starts_its_session_ids_with_its_name(tmp_path, backbone, gate):
    """What a proxy routes on: /v1/sessions/<replica>-… goes to the replica that holds it."""
    with running(tmp_path, replica="r7") as replica, device(replica.url) as client:
        run = client.run(None, **session_body(backbone, gate, "base"))
        sid = run.session["session_id"]
        record = client.http.get(f"/v1/sessions/{sid}").json()
    assert sid.startswith("r7-") and len(sid) == 32 and record["status"] == "finished"


def test_inside_a_capped_batch_no_session_starves_and_a_cancel_ends_only_its_own(
    tmp_path, backbone, gate
):
    """Five sessions, at most 2 rows per pass: one is cancelled mid-stream, the other four still
    get every token of their run alone (first come, first served: none starves)."""
    decode = DecodeConfig(max_new_tokens=NEW_TOKENS)
    base = SPAModel(backbone, SPAConfig(setting="base"))
    want = [t.id for t in generate(base, _prompt(backbone), decode)]
    runs, failures, cancelled = {}, [], {}
    barrier = threading.Barrier(5)

    def work(name: str) -> None:
        try:
            with device(short.url, name) as client:
                barrier.wait(timeout=60)
                if name != "victim":
                    runs[name] = client.run(None, **session_body(backbone, gate, "base"))
                    return
                body = session_body(backbone, gate, "base")
                body["decoding"]["max_new_tokens"] = 128  # far more than it will get
                sid = client.open(**body)["session_id"]
                events = client.events(sid)
                next(e for e in events if e["event"] == "token")
                client.http.post(f"/v1/sessions/{sid}/cancel")
                cancelled["events"] = list(events)
        except Exception as exc:  # reported below, with the thread's name
            failures.append((name, exc))

    with running(tmp_path, max_batch=2) as short:
        threads = [threading.Thread(target=work, args=(n,)) for n in ("a", "b", "c", "d", "victim")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert not failures, failures
    assert {name: run.ids for name, run in runs.items()} == {n: want for n in "abcd"}
    done = cancelled["events"][-1]
    assert done["event"] == "done" and done["status"] == "cancelled"
    assert done["totals"]["tokens"] < 128
