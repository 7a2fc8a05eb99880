"""`spa device serve` with the official `openai` client (a real client we did not write) against a
real `spa cloud` on 127.0.0.1 (tiny backbone): the same tokens as `DeviceAgent.generate`, OpenAI
errors a client understands, a bearer token, and nothing private on the wire."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from cloud_server import free_port, running
from privacy import Recording, corpus, leaks

from device_agent.agent import DeviceAgent
from device_agent.openai_server import ServeConfig, _Stops, create_app, device_opener
from device_agent.trainer import DeviceTrainConfig
from personalization.config import DecodeConfig
from personalization.training.train import TrainConfig

SIGNATURE = "~zq sig~"
FAST = DeviceTrainConfig(train=TrainConfig(epochs=30, lr=3e-3, batch_size=8), calibration_prompts=2)
PROMPT = "Tell me about topic 3."
SPA = [sys.executable, "-c", "from app.cli import main; main()"]  # the `spa` command


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    with running(tmp_path_factory.mktemp("cloud")) as server:
        yield server.url


@pytest.fixture(scope="module")
def device(cloud, tmp_path_factory) -> Path:
    """A device named `phone` that trained `spa` on a user who signs every answer."""
    root = tmp_path_factory.mktemp("device") / "dev"
    with DeviceAgent.init(root, cloud, "phone") as agent:
        agent.store.add_items(
            [
                {"kind": "pair", "instruction": f"Tell me about topic {i}.", "output": SIGNATURE}
                for i in range(16)
            ]
        )
        agent.train(FAST)
    return root


@contextlib.contextmanager
def serving(root: Path, *args: str) -> Iterator[str]:
    """`spa device serve` as its own process; yields its /v1 URL and stops it after (its output
    goes to serve.log beside the device, for a failing test to show)."""
    port = free_port()
    log = root.parent / "serve.log"
    command = [*SPA, "device", "serve", "--dir", str(root), "--port", str(port), *args]
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(httpx.TransportError):
                httpx.get(f"{url}/models", timeout=2)
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"spa device serve did not start: {log.read_text()}")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def api(device) -> Iterator[openai.OpenAI]:
    with serving(device) as url:
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


def _reference(device: Path, prompt, decode: DecodeConfig, **kw) -> tuple[str, list[int]]:
    with DeviceAgent(device) as agent:
        generation = agent.generate(prompt, decode=decode, **kw)
        tokens = list(generation)
    return generation.text, [t.id for t in tokens]


def test_models_list_the_devices_trained_settings_and_base(api):
    ids = [m.id for m in api.models.list()]
    assert ids == ["spa:phone", "spa:phone:spa", "base"]


def test_chat_gives_exactly_the_tokens_of_the_device_agent(api, device):
    text, ids = _reference(device, PROMPT, DecodeConfig(max_new_tokens=12))
    reply = api.chat.completions.create(
        model="spa:phone",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=12,
        temperature=0,
    )
    assert reply.choices[0].message.content == text
    assert [t["token_id"] for t in reply.spa["tokens"]] == ids
    assert {t["branch"] for t in reply.spa["tokens"]} <= {"cloud", "device", "fallback"}
    assert "device" in {t["branch"] for t in reply.spa["tokens"]}  # the side network spoke
    assert reply.choices[0].finish_reason == ("length" if len(ids) == 12 else "stop")
    usage = reply.usage
    assert usage.completion_tokens == len(ids)
    assert usage.total_tokens == usage.prompt_tokens + len(ids) and usage.prompt_tokens > 0
    assert usage.spa["contacts"] >= 1 and usage.spa["bytes_to_device"] > 0 and usage.spa["M"] > 0


def test_streamed_seeded_sampling_equals_the_device_agent(api, device):
    decode = DecodeConfig(strategy="sample", temperature=0.8, top_p=0.9, seed=7, max_new_tokens=10)
    text, ids = _reference(device, PROMPT, decode)
    stream = api.chat.completions.create(
        model="spa:phone:spa",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=10,
        temperature=0.8,
        top_p=0.9,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == text
    assert [c.spa["token_id"] for c in chunks if getattr(c, "spa", None)] == ids
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] in ("stop", "length") and set(finals[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)


def test_completions_and_the_base_model_equal_the_device_agent(api, device):
    text, _ = _reference(device, PROMPT, DecodeConfig(max_new_tokens=8), chat=False)
    reply = api.completions.create(model="spa:phone", prompt=PROMPT, max_tokens=8, temperature=0)
    assert reply.choices[0].text == text
    base_text, _ = _reference(device, PROMPT, DecodeConfig(max_new_tokens=8), setting="base")
    base = api.chat.completions.create(
        model="base", messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0
    )
    assert base.choices[0].message.content == base_text
    assert {t["branch"] for t in base.spa["tokens"]} == {"cloud"}
    streamed = api.completions.create(
        model="spa:phone", prompt=PROMPT, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text


def test_a_conversation_goes_through_the_chat_template(api, device):
    turns = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Tell me about topic 1."},
        {"role": "assistant", "content": SIGNATURE},
        {"role": "user", "content": PROMPT},
    ]
    text, _ = _reference(device, turns, DecodeConfig(max_new_tokens=8))
    reply = api.chat.completions.create(
        model="spa:phone", messages=turns, max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.content == text
    with DeviceAgent(device) as agent:  # the whole conversation was read, not its last turn
        alone = agent.generate(PROMPT, decode=DecodeConfig(max_new_tokens=1))
        list(alone)
    assert reply.usage.prompt_tokens > alone.session.prompt_tokens


def test_a_stop_sequence_ends_the_answer_before_it(api, device):
    text, _ = _reference(device, PROMPT, DecodeConfig(max_new_tokens=16))
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    kwargs = dict(model="spa:phone", max_tokens=16, temperature=0, stop=[stop])
    messages = [{"role": "user", "content": PROMPT}]
    reply = api.chat.completions.create(messages=messages, **kwargs)
    assert reply.choices[0].message.content == text[: text.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = api.chat.completions.create(messages=messages, stream=True, **kwargs)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[: text.index(stop)]


@pytest.mark.parametrize(
    ("stops", "pieces", "shown", "stopped"),
    [
        (["END"], ["ab", "cE", "N", "Dx"], ["ab", "c", "", ""], True),
        (["END"], ["ab", "cE", "x"], ["ab", "c", "Ex"], False),
        (["xy", "abc"], ["a", "b", "x", "y"], ["", "", "ab", ""], True),
    ],
)
def test_stop_sequences_hold_back_only_what_may_begin_one(stops, pieces, shown, stopped):
    watcher, out, ended = _Stops(stops), [], False
    for piece in pieces:
        text, ended = watcher.feed(piece)
        out.append(text)
        if ended:
            break
    assert out + [""] * (len(shown) - len(out)) == shown and ended == stopped


def test_bad_requests_get_openai_errors_naming_the_field(api):
    user = [{"role": "user", "content": PROMPT}]
    with pytest.raises(openai.NotFoundError) as e:
        api.chat.completions.create(model="gpt-4o", messages=user)
    assert "gpt-4o" in e.value.message and "spa:phone" in e.value.message
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="spa:phone", messages=[])
    assert e.value.body["param"] == "messages" and "messages" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="spa:phone", messages=user, n=2)
    assert e.value.body["param"] == "n" and "n = 1" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(
            model="spa:phone", messages=user, extra_body={"spa": {"profile": "moon"}}
        )
    assert e.value.body["param"] == "spa.profile" and "lte" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # the cloud's refusal, passed on
        api.chat.completions.create(model="spa:phone", messages=user, max_tokens=100_000)
    assert "max_new_tokens" in e.value.message
    # the device still serves after each refusal
    assert api.chat.completions.create(model="base", messages=user, max_tokens=2).choices


def test_a_cloud_that_is_down_is_a_clear_error_not_a_hang(device):
    dead = f"http://127.0.0.1:{free_port()}"
    with serving(device, "--cloud-url", dead) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        t = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(
                model="spa:phone", messages=[{"role": "user", "content": PROMPT}]
            )
        assert time.monotonic() - t < 30
        assert e.value.status_code == 503 and "unreachable" in e.value.message
        assert e.value.body["code"] == "cloud_unreachable"
        assert [m.id for m in client.models.list()][-1] == "base"  # the device itself answers


def test_an_api_key_is_required_when_set_and_beyond_localhost(device, cloud):
    with serving(device, "--api-key", "s3cret") as url:
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert "API key" in e.value.message
        assert openai.OpenAI(base_url=url, api_key="s3cret").models.list().data
    refused = subprocess.run(
        [*SPA, "device", "serve", "--dir", str(device), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"COLUMNS": "250"},
    )
    assert refused.returncode != 0 and "--api-key" in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr


@contextlib.contextmanager
def in_process(config: ServeConfig) -> Iterator[str]:
    """The same app in this process (uvicorn in a thread), for a recording transport."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(config), port=port, log_level="warning", ws="none")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class Kept(Recording):
    """One recording for every request: each request's device client closes its transport."""

    def close(self):
        pass


def test_privacy_no_side_network_parameter_leaves_through_the_openai_path(device):
    recording = Kept()
    config = ServeConfig(users={"phone": device_opener(device, transport=recording)})
    with in_process(config) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        user = [{"role": "user", "content": PROMPT}]
        for mode in ("pull", "streamed", "run-ahead"):
            reply = client.chat.completions.create(
                model="spa:phone",
                messages=user,
                max_tokens=8,
                temperature=0,
                extra_body={"spa": {"tap_mode": mode}},
            )
            assert reply.choices[0].message.content
        strict = client.chat.completions.create(
            model="spa:phone", messages=user, max_tokens=4, extra_body={"spa": {"strict": True}}
        )
        assert strict.usage.spa["M"] == 1.0
    with DeviceAgent(device) as agent:
        model = agent.model()
    sent = corpus(recording.sent)
    checked = 0
    for name, p in model.side.named_parameters():
        if p.numel() >= 8 and p.detach().abs().max() > 0:
            assert leaks(sent, p) == [], f"side.{name} left the device"
            checked += 1
    assert checked >= 5
    assert "fp32" in leaks(sent, model.gate.linear.weight)  # the detector finds what is sent
    assert any(b"/v1/sessions" in c.split(b"\n", 1)[0] for c in recording.sent)
