"""The device agent against a real cloud server on 127.0.0.1 (tiny backbone): end to end, privacy,
a cloud that dies mid-generation, a crash while checkpointing, network emulation, retries."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch
import uvicorn
from cloud_server import free_port, running, spawn, stop, wait_ready
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from privacy import Recording, corpus, leaks

import personalization.training.checkpoint as checkpoint_module
from device_agent.agent import DeviceAgent
from device_agent.client import ClientConfig, CloudClient
from device_agent.errors import CloudError, CloudUnreachable, ProtocolMismatch
from device_agent.tap_modes import Streamed
from device_agent.trainer import DeviceTrainConfig
from personalization.config import DecodeConfig
from personalization.latency import NetworkProfile
from personalization.training.train import TrainConfig
from protocol import PROTOCOL_VERSION
from protocol.messages import Info, SessionIn

SIGNATURE = "~zq sig~"
FAST = DeviceTrainConfig(train=TrainConfig(epochs=30, lr=3e-3, batch_size=8), calibration_prompts=2)

WHAT_IF_ROWS = ["base", "lora", "adapter", "lst", "full", "choice", "spa", "spa run-ahead"]


def _history(n: int = 24) -> list[dict]:
    """A user who signs every answer the same way — a pattern the random backbone never emits."""
    return [
        {"kind": "pair", "instruction": f"Tell me about topic {i}.", "output": SIGNATURE}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    with running(tmp_path_factory.mktemp("cloud")) as server:
        yield server.url


@pytest.fixture(scope="module")
def trained(cloud, tmp_path_factory):
    """A device that imported a history (JSONL) and trained `spa` on it."""
    root = tmp_path_factory.mktemp("device") / "dev"
    history = root.parent / "history.jsonl"
    history.write_text(
        "".join(
            json.dumps({"prompt": i["instruction"], "response": i["output"]}) + "\n"
            for i in _history()
        )
    )
    from device_agent.history import read_items

    with DeviceAgent.init(root, cloud, "e2e") as agent:
        agent.store.add_items(read_items(history))
        agent.train(FAST)
    return root


def _signature_tokens(tokens) -> list:
    """The tokens whose text overlaps the first occurrence of the signature."""
    text = "".join(t.text for t in tokens)
    start = text.index(SIGNATURE)
    out, pos = [], 0
    for t in tokens:
        if pos < start + len(SIGNATURE) and pos + len(t.text) > start:
            out.append(t)
        pos += len(t.text)
    return out


# ---- 1. end to end ---------------------------------------------------------------------------
def test_end_to_end_device_tokens_where_the_pattern_is_and_books_that_add_up(trained, cloud):
    with DeviceAgent(trained) as agent:
        run = agent.store.runs()[-1]
        assert run.status == "finished" and run.epochs_done == 30
        assert run.feature_passes == len(_history())  # every example fetched once
        generation = agent.generate(
            "Tell me about topic 3.", decode=DecodeConfig(max_new_tokens=16)
        )
        tokens = list(generation)
        assert generation.status == "finished"
        assert SIGNATURE in generation.text
        assert {t.branch for t in _signature_tokens(tokens)} == {"device"}

        a = generation.accounts
        assert a.tokens == len(tokens) and a.device_tokens >= len(_signature_tokens(tokens))
        for part in (
            "cloud_s",
            "device_s",
            "net_s",
            "bytes_to_device",
            "bytes_from_device",
            "contacts",
        ):
            total = {
                "cloud_s": a.t_cloud,
                "device_s": a.t_device,
                "net_s": a.t_net,
                "bytes_to_device": a.bytes_to_device,
                "bytes_from_device": a.bytes_from_device,
                "contacts": a.contacts,
            }[part]
            assert sum(getattr(t, part) for t in tokens) == pytest.approx(total, abs=1e-9)
        assert a.t_total == pytest.approx(a.t_cloud + a.t_device + a.t_net, abs=1e-12)
        assert sum(t.total_s for t in tokens) == pytest.approx(a.t_total, abs=1e-9)
        assert a.m == pytest.approx(a.contacts / a.tokens)

        # the device's books agree with the cloud's own record of the session
        record = agent.client.session_record(generation.session.session_id)
        assert record.device_contacts == a.contacts
        assert record.bytes_to_device == a.bytes_to_device
        assert record.bytes_from_device == a.bytes_from_device
        assert record.tokens == a.tokens
        assert record.cloud_s == pytest.approx(a.t_cloud, abs=1e-3 * a.tokens)

        (log,) = agent.store.generations(limit=1)
        assert log.text == generation.text and log.status == "finished"
        assert log.totals["contacts"] == a.contacts and len(log.tokens) == a.tokens

        # base: the backbone alone, never a contact
        base = agent.generate(
            "Tell me about topic 3.", setting="base", decode=DecodeConfig(max_new_tokens=16)
        )
        assert {t.branch for t in base} == {"cloud"}
        assert SIGNATURE not in base.text and base.accounts.contacts == 0


def test_a_cloud_computing_in_bfloat16_trains_and_serves_a_device(tmp_path):
    """`spa cloud --dtype bfloat16`: the backbone computes in bf16, taps and g(x) keep their
    float16 codec on the wire, and a device trains on it and takes its tokens as on float32."""
    from device_agent.history import read_items

    history = tmp_path / "history.jsonl"
    rows = [{"prompt": i["instruction"], "response": i["output"]} for i in _history()]
    history.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with (
        running(tmp_path, dtype="bfloat16") as server,
        DeviceAgent.init(tmp_path / "dev", server.url, "bf16") as agent,
    ):
        info = agent.client.info()
        assert info.dtype == "bfloat16" and info.tap_dtype == "float16"
        agent.store.add_items(read_items(history))
        agent.train(FAST)
        generation = agent.generate(
            "Tell me about topic 3.", decode=DecodeConfig(max_new_tokens=16)
        )
        tokens = list(generation)
    assert generation.status == "finished" and SIGNATURE in generation.text
    assert {t.branch for t in _signature_tokens(tokens)} == {"device"}


@pytest.mark.parametrize(
    ("setting", "controls"),
    [("spa", {}), ("full", {}), ("spa", {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2})],
)
def test_beam_search_over_http_equals_in_process_beam_search(
    trained, tiny_llama, setting, controls
):
    """Beams cross the wire as rows (the prompt's taps once) with the reorders since the last
    answer: the remote search is the in-process one, token for token, branch for branch."""
    from personalization.config import SPAConfig
    from personalization.decoding import generate
    from personalization.training.checkpoint import load_checkpoint

    prompt = tiny_llama.encode_prompt("Tell me about topic 3.")
    decode = DecodeConfig(strategy="beam", max_new_tokens=12, num_beams=3, **controls)
    with DeviceAgent(trained) as agent:
        model = load_checkpoint(
            agent.store.path(agent.store.current_checkpoint().path), tiny_llama
        )[0]
        model.config = SPAConfig(
            setting=setting, threshold=model.config.threshold, wire_dtype=model.config.wire_dtype
        )
        expected = generate(model.eval(), prompt, decode)
        want = list(expected)
        remote = agent.generate(prompt, setting="spa", decode=decode)
        if setting == "full":
            remote.setting = "full"
        got = list(remote)
    assert [t.id for t in got] == [t.id for t in want]
    assert [t.branch for t in got] == [t.branch for t in want]
    assert "device" in {t.branch for t in got}
    assert remote.accounts.contacts == expected.books.contacts > 1
    assert remote.accounts.tap_positions == expected.books.tap_positions  # shared prompt sent once
    assert remote.status == "finished"


@pytest.mark.parametrize("encoding", ["int8", "lowrank32-int8"])
def test_compact_tap_encodings_train_and_serve_the_same_inputs(
    cloud, tmp_path, tiny_llama, encoding
):
    """A device trained under a compact encoding (its basis fetched from the cloud) generates
    remotely exactly what the same checkpoint generates in-process with the same round trip."""
    from dataclasses import replace

    from device_agent.history import pair_item
    from personalization.decoding import generate
    from personalization.training.checkpoint import load_checkpoint

    prompt = tiny_llama.encode_prompt("Tell me about topic 3.")
    decode = DecodeConfig(max_new_tokens=12)
    with DeviceAgent.init(tmp_path / "dev", cloud, encoding) as agent:
        agent.store.add_items([pair_item(i["instruction"], i["output"]) for i in _history(12)])
        agent.train(replace(FAST, tap_encoding=encoding, train=replace(FAST.train, epochs=8)))
        model = load_checkpoint(
            agent.store.path(agent.store.current_checkpoint().path), tiny_llama
        )[0]
        assert model.config.tap_encoding == encoding  # the checkpoint remembers it
        model.config = replace(model.config, threshold=0.0)  # ask the device every token
        expected = generate(model.eval(), prompt, decode)
        want = list(expected)
        remote = agent.generate(prompt, threshold=0.0, decode=decode)
        got = list(remote)
    assert [t.id for t in got] == [t.id for t in want]
    assert [t.branch for t in got] == [t.branch for t in want] == ["device"] * len(want)
    assert [t.gate_prob for t in got] == pytest.approx([t.gate_prob for t in want], abs=1e-5)
    assert remote.accounts.tap_positions == expected.books.tap_positions
    assert remote.session.tap_encoding == encoding
    with DeviceAgent(tmp_path / "dev") as agent:  # the same, with the taps streamed
        streamed = agent.generate(prompt, threshold=0.0, decode=decode, tap_mode="streamed")
        assert [(t.id, t.branch, t.gate_prob) for t in streamed] == [
            (t.id, t.branch, t.gate_prob) for t in got
        ]
    assert streamed.session.tap_mode == "streamed" and streamed.accounts.t_device_ahead > 0


@pytest.mark.parametrize("strict", [False, True])
def test_streamed_taps_give_the_tokens_of_pull_mode(trained, strict):
    """Streamed: each position's taps arrive as they exist and a contact only asks for g; the
    tokens, branches and gate probabilities are pull mode's, and so are the device's contacts."""
    prompt, decode = "Tell me about topic 7.", DecodeConfig(max_new_tokens=16)
    with DeviceAgent(trained) as agent:
        runs = {}
        for mode in ("pull", "streamed"):
            g = agent.generate(prompt, decode=decode, strict=strict, tap_mode=mode)
            runs[mode] = ([(t.id, t.branch, t.gate_prob) for t in g], g)
    (pull, p), (streamed, s) = runs["pull"], runs["streamed"]
    assert streamed == pull and {b for _, b, _ in pull} >= {"device"}
    assert s.accounts.contacts == p.accounts.contacts
    assert s.session.tap_mode == "streamed" and p.session.tap_mode == "pull"
    # streamed taps arrive ahead of need: each contact carries none
    assert s.accounts.tap_positions == len(s.tokens) - 1 + s.session.prompt_tokens


def test_a_device_that_stalls_in_streamed_mode_resumes_with_correct_answers(
    trained, tiny_llama, monkeypatch
):
    """The device misses one deadline (the cloud falls back to f's token) and catches up: every
    later token is what the same checkpoint gives in-process when that one answer is missing."""
    from personalization.decoding import generate
    from personalization.training.checkpoint import load_checkpoint

    prompt = tiny_llama.encode_prompt("Tell me about topic 2.")
    decode = DecodeConfig(max_new_tokens=10)
    with DeviceAgent(trained) as agent:
        model = load_checkpoint(
            agent.store.path(agent.store.current_checkpoint().path), tiny_llama
        )[0].eval()
        remote = agent.generate(
            prompt, threshold=0.0, decode=decode, tap_mode="streamed", deadline_s=1.0
        )
        answer, calls = Streamed.side, []

        def stalling(mode, event):
            calls.append(1)
            if len(calls) == 2:
                time.sleep(1.5)  # past the deadline: the cloud moves on
            return answer(mode, event)

        monkeypatch.setattr(Streamed, "side", stalling)
        got = [(t.id, t.branch) for t in remote]
    from dataclasses import replace

    model.config = replace(model.config, threshold=0.0)
    # one contact per token (threshold 0): the answers the cloud did not get in time
    missed = {i for i, (_, branch) in enumerate(got) if branch == "fallback"}
    cache, asked = model.side.new_cache(), []

    def device(ask):  # in-process, missing the answers the remote device missed
        asked.append(1)
        if len(asked) - 1 in missed:
            return None
        return model.wire(model.side(ask.taps, cache)[:, -1])

    want = [(t.id, t.branch) for t in generate(model, prompt, decode, device=device)]
    assert got == want and 1 in missed and got[-1][1] == "device"


class _Dropping(httpx.HTTPTransport):
    """A link whose first event streams break after the given numbers of bytes (mid-line, as a
    real drop does); the server sees the connection close."""

    def __init__(self, cuts: list[int]):
        super().__init__()
        self.cuts = list(cuts)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.url.path.endswith("/events") and self.cuts:
            response.stream = _Cut(response.stream, self.cuts.pop(0))
        return response


class _Cut(httpx.SyncByteStream):
    def __init__(self, stream: httpx.SyncByteStream, at: int):
        self.stream, self.at = stream, at

    def __iter__(self):
        sent = 0
        for chunk in self.stream:
            if sent + len(chunk) >= self.at:
                yield chunk[: self.at - sent]
                self.stream.close()
                raise httpx.ReadError("the link dropped")
            sent += len(chunk)
            yield chunk

    def close(self) -> None:
        self.stream.close()


@pytest.mark.parametrize("mode", ["pull", "streamed"])
def test_a_device_whose_event_stream_drops_resumes_it_with_the_same_answer(trained, mode):
    """Streams cut mid-line at several points (prompt taps, side requests, tokens): the device
    resumes each after the last event it read, and gets the tokens, branches and gate
    probabilities of an unbroken run."""
    prompt, decode = "Tell me about topic 3.", DecodeConfig(max_new_tokens=10)

    def run(agent):
        remote = agent.generate(prompt, threshold=0.0, decode=decode, tap_mode=mode)
        return [(t.id, t.branch, t.gate_prob) for t in remote], remote

    with DeviceAgent(trained) as agent:
        want, unbroken = run(agent)
    size = unbroken.accounts.bytes_to_device  # cuts inside the start event, taps, requests, tokens
    cuts = [100, size // 3, 40, size // 4]
    with DeviceAgent(trained, transport=_Dropping(cuts)) as agent:
        got, remote = run(agent)
        record = agent.client.session_record(remote.session.session_id)
    assert got == want and {b for _, b, _ in want} >= {"device"}
    assert remote.accounts.resumes == len(cuts) and remote.status == "finished"
    assert record.status == "finished" and record.fallbacks == 0


def test_an_ended_session_stays_resumable_and_after_is_checked(trained):
    """`?after=N` replays from event N, also once the session has ended (a device that missed
    `done` still reads it); beyond what was sent is a 422."""
    with DeviceAgent(trained) as agent:
        remote = agent.generate(
            "Tell me about topic 4.", setting="base", decode=DecodeConfig(max_new_tokens=4)
        )
        tokens = list(remote)
        sid, http = remote.session.session_id, agent.client.http
        replay = http.get(f"/v1/sessions/{sid}/events", params={"after": 2})
        beyond = http.get(f"/v1/sessions/{sid}/events", params={"after": 99})
    lines = [json.loads(line) for line in replay.text.splitlines()]
    assert len(tokens) == 4 and replay.status_code == 200
    assert [e["event"] for e in lines] == ["token", "token", "token", "done"]
    assert [e["index"] for e in lines[:-1]] == [1, 2, 3]
    assert beyond.status_code == 422 and "has sent 6 events" in beyond.json()["detail"]


def test_what_if_table_has_every_device_setting_with_paper_contacts(trained):
    with DeviceAgent(trained) as agent:
        generation = agent.generate("Tell me about topic 5.", decode=DecodeConfig(max_new_tokens=8))
        list(generation)
        net = NetworkProfile("test", 0.1, 10e6, 10e6)
        rows = {r.setting: r for r in agent.what_if(generation, net)}
        L = agent.client.info().num_layers
        assert list(rows) == WHAT_IF_ROWS
        assert rows["base"].m == 0 and rows["base"].network_ms == 0
        assert min(r.total_ms for r in rows.values()) == rows["base"].total_ms
        assert (rows["lora"].m, rows["adapter"].m, rows["full"].m) == (L, 2 * L, 1.0)
        # not measured in run-ahead: every device token counted as a correction (the worst case)
        assert rows["spa run-ahead"].m == pytest.approx(generation.accounts.m)
        assert rows["spa"].m == pytest.approx(generation.accounts.m)
        for r in rows.values():
            assert r.total_ms == pytest.approx(r.inference_ms + r.network_ms)
        assert rows["adapter"].network_ms > rows["lora"].network_ms > rows["full"].network_ms


# ---- 2. privacy --------------------------------------------------------------------------------
def test_privacy_no_side_network_parameter_leaves_the_device(cloud, tmp_path):
    recording = Recording()
    root = tmp_path / "dev"
    with DeviceAgent.init(root, cloud, "private", transport=recording) as agent:
        agent.store.add_items(_history(16))
        agent.train(FAST)
        list(agent.generate("Tell me about topic 1.", decode=DecodeConfig(max_new_tokens=8)))
        streamed = agent.generate(
            "Tell me about topic 1.", tap_mode="streamed", decode=DecodeConfig(max_new_tokens=8)
        )
        assert len(list(streamed)) > 0 and streamed.session.tap_mode == "streamed"
        model = agent.model()
        side = {n: p for n, p in model.side.named_parameters()}
        gate = dict(model.gate.named_parameters())
    open_gated = corpus(recording.sent)

    strict_recording = Recording()
    with DeviceAgent(root, transport=strict_recording) as agent:
        strict = agent.generate(
            "Tell me about topic 1.", strict=True, decode=DecodeConfig(max_new_tokens=8)
        )
        assert len(list(strict)) > 0 and strict.accounts.m == 1.0  # asked every token
    strict_corpus = corpus(strict_recording.sent)

    run_ahead_recording = Recording()  # run-ahead: the gate stays on the device too
    with DeviceAgent(root, transport=run_ahead_recording) as agent:
        ahead = agent.generate(
            "Tell me about topic 1.", tap_mode="run-ahead", decode=DecodeConfig(max_new_tokens=8)
        )
        assert len(list(ahead)) > 0 and ahead.session.tap_mode == "run-ahead"
    ahead_corpus = corpus(run_ahead_recording.sent)

    checked = 0
    for name, p in side.items():
        if p.numel() >= 8 and p.detach().abs().max() > 0:
            assert leaks(open_gated, p) == [], f"side.{name} left the device"
            assert leaks(strict_corpus, p) == [], f"side.{name} left the device (strict)"
            assert leaks(ahead_corpus, p) == [], f"side.{name} left the device (run-ahead)"
            checked += 1
    assert checked >= 5
    # the detector works: the gate's weights (sent by design, fp32) are found; strict keeps them
    assert "fp32" in leaks(open_gated, gate["linear.weight"])
    assert leaks(strict_corpus, gate["linear.weight"]) == []
    assert leaks(ahead_corpus, gate["linear.weight"]) == []
    # run-ahead sends verdicts (epoch, index, token) and nothing shaped like a tensor
    verdicts = [c for c in run_ahead_recording.sent if b"/verdicts" in c.split(b"\n", 1)[0]]
    assert verdicts and all(len(c.split(b"\n", 1)[1]) < 80 for c in verdicts)
    # what did go out: history text for features, prompts, g(x) answers — and no other tensor
    answers = [c for c in recording.sent if b"/answer" in c.split(b"\n", 1)[0]]
    H = model.side.config.hidden_size
    assert answers and all(len(c.split(b"\n", 1)[1]) == 2 * H for c in answers)  # fp16 g(x)


# ---- 3. the cloud dies mid-generation ------------------------------------------------------------
def test_cloud_killed_mid_generation_clear_error_store_intact_then_recovers(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = spawn(tmp_path, port)
    try:
        wait_ready(process, url)
        root = tmp_path / "dev"
        config = ClientConfig(attempts=2, backoff_s=0.05, connect_s=2)
        with DeviceAgent.init(root, url, "fragile", client_config=config) as agent:
            agent.store.add_items(_history(12))
            agent.train(DeviceTrainConfig(setting="full", train=TrainConfig(epochs=2)))
            checkpoint = agent.store.current_checkpoint()
            generation = agent.generate(
                "Tell me about topic 2.", setting="full", decode=DecodeConfig(max_new_tokens=40)
            )
            tokens = iter(generation)
            next(tokens)  # `full` asks the device every token: the cloud waits on us
            process.kill()
            process.wait(timeout=30)
            with pytest.raises(CloudUnreachable, match="connection to the cloud broke after 1 tok"):
                list(tokens)
            assert generation.status == "failed"
            # the store is intact: history, run, checkpoint (loadable), and the failure logged
            assert len(agent.store.items()) == 12
            assert agent.store.current_checkpoint().sha256 == checkpoint.sha256
            assert agent.model().setting == "full"
            (log,) = agent.store.generations(limit=1)
            assert log.status == "failed" and "broke after 1 tokens" in log.error
            with pytest.raises(CloudUnreachable, match=f"cannot reach the cloud at {url}"):
                list(agent.generate("again?", setting="full"))
        process = spawn(tmp_path, port)  # the same database: the device is still registered
        wait_ready(process, url)
        with DeviceAgent(root, client_config=config) as agent:
            again = agent.generate(
                "Tell me about topic 2.", setting="full", decode=DecodeConfig(max_new_tokens=6)
            )
            assert len(list(again)) > 0 and again.status == "finished"
            assert [g.status for g in agent.store.generations()][:1] == ["finished"]
    finally:
        stop(process)


# ---- 4. a crash while writing a checkpoint ---------------------------------------------------
def test_crash_while_checkpointing_keeps_the_previous_checkpoint_and_resumes(
    cloud, tmp_path, monkeypatch
):
    root = tmp_path / "dev"
    with DeviceAgent.init(root, cloud, "crashy") as agent:
        agent.store.add_items(_history(12))
        cfg = DeviceTrainConfig(setting="full", train=TrainConfig(epochs=3))
        agent.train(cfg)
        good = agent.store.current_checkpoint()
        before = agent.model().side.up.weight.detach().clone()

        real_save, calls = checkpoint_module.save_file, []

        def crash_on_second_save(tensors, path, metadata=None):
            calls.append(path)
            if len(calls) == 2:  # mid-write: half a file on disk, then the process "dies"
                with open(path, "wb") as f:
                    f.write(b"\x00" * 100)
                raise KeyboardInterrupt("power cut")
            real_save(tensors, path, metadata=metadata)

        monkeypatch.setattr(checkpoint_module, "save_file", crash_on_second_save)
        with pytest.raises(KeyboardInterrupt):
            agent.train(DeviceTrainConfig(setting="full", train=TrainConfig(epochs=3, lr=5e-3)))
        monkeypatch.setattr(checkpoint_module, "save_file", real_save)

        assert not list((root / "checkpoints").glob("*.tmp"))  # no debris
        assert agent.store.current_checkpoint().id == good.id  # still the last good one
        assert torch.equal(agent.model().side.up.weight, before)  # ...and it loads
        crashed = agent.store.runs()[-1]
        assert crashed.status == "failed" and crashed.epochs_done == 1
        assert "power cut" in crashed.error

        resumed = agent.train(resume=True)  # continues from the epoch-1 checkpoint
        assert resumed.id == crashed.id and resumed.status == "finished"
        assert resumed.epochs_done == 3 and len(resumed.epochs) == 3
        assert agent.store.current_checkpoint().run_id == crashed.id


# ---- 5. network emulation is real ------------------------------------------------------------
def test_emulated_rtt_shows_in_measured_network_time(trained):
    net = NetworkProfile("rtt100", rtt_s=0.100, down_bps=50e6, up_bps=20e6)
    with DeviceAgent(trained, profile=net) as agent:
        generation = agent.generate(
            "Tell me about topic 7.",
            strict=True,  # M = 1
            decode=DecodeConfig(max_new_tokens=10),
        )
        tokens = list(generation)
        a = generation.accounts
        assert a.contacts == len(tokens) and a.m == 1.0
        expected = a.contacts * net.rtt_s + net.transfer_s(a.bytes_to_device, a.bytes_from_device)
        # the link never delivers faster than the profile; HTTP and a busy machine add a little
        # (a bound, not a timing: how much it adds belongs to benchmarks)
        assert 0.95 * expected <= a.t_net <= 2 * expected, (a.t_net, expected)
        assert agent.client.link.bytes_down >= a.bytes_to_device  # the link counted what crossed it


def test_delay_line_charges_one_way_latency_once_per_burst():
    """A streamed burst of chunks arrives one-way latency late, not latency × chunks."""
    app = FastAPI()

    @app.get("/burst")
    def burst():
        from fastapi.responses import StreamingResponse

        return StreamingResponse(b"x" * 100 + b"\n" for _ in range(20))

    with _serve(app) as url:
        net = NetworkProfile("slow", rtt_s=0.2, down_bps=1e9, up_bps=1e9)
        client = CloudClient(url, profile=net)
        start = time.perf_counter()
        body = client.http.get("/burst").content
        elapsed = time.perf_counter() - start
        client.close()
    assert len(body) == 20 * 101
    assert 0.2 <= elapsed < 1.0  # ~RTT (+ local overhead on a busy machine), not 20 × 0.1 s
    assert client.link.bytes_down == len(body)


# ---- 6. resilience -------------------------------------------------------------------------------
FLAKY_INFO = {
    "version": "0",
    "protocol_version": PROTOCOL_VERSION,
    "backbone": "flaky",
    "fingerprint": "0",
    "num_layers": 2,
    "hidden_size": 8,
    "vocab_size": 16,
    "eos_token_ids": [0],
    "chat_template": False,
    "rungs_offered": [1, 2],
    "default_rungs": [2],
    "tap_dtype": "float16",
    "tap_dtypes": ["float16"],
    "tap_encoding": "raw-le",
    "tap_encodings": ["raw-le"],
    "tap_mode": "pull",
    "tap_modes": ["pull"],
    "settings": ["base"],
    "strategies": ["greedy"],
    "limits": {},
    "parameters": {"backbone": 1},
}


class _Flaky:
    """A real HTTP server whose /v1/info fails with 503 `failures` times, then answers."""

    def __init__(self, failures: int):
        self.failures, self.calls = failures, {"info": 0, "sessions": 0}
        self.app = FastAPI()
        self.app.get("/v1/info")(self.info)
        self.app.post("/v1/sessions")(self.sessions)

    def info(self):
        self.calls["info"] += 1
        if self.calls["info"] <= self.failures:
            return JSONResponse({"detail": "warming up"}, status_code=503)
        return FLAKY_INFO

    def sessions(self):
        self.calls["sessions"] += 1
        return JSONResponse({"detail": "overloaded"}, status_code=503)


def test_idempotent_calls_retry_5xx_with_backoff_others_do_not():
    flaky = _Flaky(failures=2)
    with _serve(flaky.app) as url:
        client = CloudClient(url, config=ClientConfig(attempts=4, backoff_s=0.01))
        assert client.info() == Info.model_validate(FLAKY_INFO)
        assert flaky.calls["info"] == 3  # two 503s, then success
        with pytest.raises(CloudError, match="overloaded") as err:
            client.open_session(SessionIn(prompt="hi", setting="base"))
        assert err.value.status == 503 and flaky.calls["sessions"] == 1  # never repeated
        client.close()
    flaky = _Flaky(failures=10)
    with _serve(flaky.app) as url:
        client = CloudClient(url, config=ClientConfig(attempts=3, backoff_s=0.01))
        with pytest.raises(CloudError, match=r"\(503\): warming up"):
            client.info()
        assert flaky.calls["info"] == 3  # gave up after `attempts`
        client.close()


def test_a_cloud_of_another_protocol_version_is_refused_with_a_clear_message():
    app = FastAPI()
    app.get("/v1/info")(lambda: FLAKY_INFO | {"protocol_version": "999"})
    with (
        _serve(app) as url,
        CloudClient(url) as client,
        pytest.raises(
            ProtocolMismatch, match=f"speaks protocol 999, this device speaks {PROTOCOL_VERSION}"
        ),
    ):
        client.facts()


def test_unreachable_cloud_is_a_clear_error_after_retries():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    client = CloudClient(url, config=ClientConfig(attempts=2, backoff_s=0.01, connect_s=1))
    with pytest.raises(CloudUnreachable, match=f"cannot reach the cloud at {url}.*spa cloud"):
        client.info()
    client.close()


class _serve:
    """Serve a FastAPI app with uvicorn on a free 127.0.0.1 port for the `with` block."""

    def __init__(self, app):
        self.server = uvicorn.Server(
            uvicorn.Config(app, port=free_port(), log_level="warning", ws="none")
        )

    def __enter__(self) -> str:
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            threading.Event().wait(0.02)
        return f"http://127.0.0.1:{self.server.config.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
