"""The Gradio demo against a real cloud (uvicorn on 127.0.0.1, tiny backbone): demo users trained
on first start, generation streamed to `gradio_client` with branch labels and live books, the
Device tab's training, readable errors, and a real headless Chromium that sees both colours."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from cloud_server import free_port, running

from app.devices import MY_DEVICE, DemoConfig, Devices
from app.ui import build
from device_agent.errors import CloudUnreachable
from device_agent.history import pair_item
from personalization.config import DEFAULT_TAP_ENCODING

pytestmark = pytest.mark.timeout(300)

CHROMIUM = os.environ.get("SPA_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("SPA_TEST_ARTIFACTS", "test-artifacts"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(page URL, Devices): the whole demo on the tiny backbone, stopped at the end."""
    directory = tmp_path_factory.mktemp("demo")
    with running(directory) as server:
        devices = Devices(directory, server.url, DemoConfig(epochs=3, calibration_prompts=2))
        assert devices.prepare() == ["pirate", "chef", "haiku"]
        page = build(devices, directory)
        port = free_port()
        page.queue().launch(
            server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
            ssr_mode=False, quiet=True,
        )  # fmt: skip
        try:
            yield f"http://127.0.0.1:{port}/", devices
        finally:
            page.close()


def generate(client, user="haiku", prompt="Any tips for a rainy Sunday?", setting="spa", **kw):
    args = dict(decoding="greedy", net="datacenter", calibrated=True, threshold=0.5,
                max_tokens=24, seed=0, beams=4, tap_mode="pull") | kw  # fmt: skip
    return client.submit(user, prompt, setting, *args.values(), api_name="/generate")


def test_first_start_trains_the_demo_users_once(demo):
    _url, devices = demo
    assert devices.prepare() == []  # cached: a second start trains nothing
    for key in ("pirate", "chef", "haiku"):
        with devices.agent(key) as agent:
            checkpoint = agent.store.current_checkpoint("spa")
            assert checkpoint is not None and checkpoint.usage is not None
            assert len(agent.store.items()) == 40


def test_generation_streams_tokens_with_branches_and_books(demo):
    from gradio_client import Client

    url, _devices = demo
    job = generate(Client(url, verbose=False))
    updates = list(job)
    streaming = [u for u in updates if u[-1].startswith("generating")]
    # one update per personalised token, each one token longer than the last, books growing
    lengths = [len(u[0]) for u in streaming]
    assert lengths == list(range(1, 25))
    counted = [u[2]["data"][0][0] for u in streaming]
    assert counted == lengths  # the books' token count follows the stream
    final = updates[-1]
    tokens, base, books, plot, what_if, status = final
    branches = {t["class_or_confidence"] for t in tokens}
    assert branches <= {"cloud", "device", "fallback"} and "device" in branches
    assert base and {t["class_or_confidence"] for t in base} == {"cloud"}
    row = dict(zip(books["headers"], books["data"][0], strict=True))
    device_tokens = sum(t["class_or_confidence"] == "device" for t in tokens)
    assert row["tokens"] == 24 and row["device contacts"] >= device_tokens > 0
    assert row["bytes down"] > 0 and row["bytes up"] > 0
    parts = row["T_cloud ms"] + row["T_device ms"] + row["T_net ms"]
    assert row["T_total ms"] == pytest.approx(parts, abs=0.2)
    assert len(plot["data"]) == 3 * 24  # every token, split in cloud / device / network
    assert [r[0] for r in what_if["data"]] == [
        "lora", "adapter", "lst", "full", "choice", "spa", "spa run-ahead"
    ]  # fmt: skip
    assert f"{device_tokens} shaped by the device" in status


def test_beam_search_through_the_cloud(demo):
    from gradio_client import Client

    url, _devices = demo
    updates = list(generate(Client(url, verbose=False), decoding="beam", beams=3))
    tokens, base, books, _plot, what_if, status = updates[-1]
    row = dict(zip(books["headers"], books["data"][0], strict=True))
    assert 0 < len(tokens) <= 24 and row["tokens"] == len(tokens) and base
    assert row["device contacts"] > 0 and "shaped by the device" in status


def test_streamed_taps_give_the_same_answer_and_show_their_bytes(demo):
    from gradio_client import Client

    url, _devices = demo
    client = Client(url, verbose=False)
    pull = generate(client, tap_mode="pull").result()
    streamed = generate(client, tap_mode="streamed").result()
    assert streamed[0] == pull[0]  # the same tokens, the same colours
    encoding = DEFAULT_TAP_ENCODING  # the demo devices' encoding
    assert f"{encoding} (streamed)" in streamed[-1] and f"{encoding} (pull)" in pull[-1]
    for books in (pull[2], streamed[2]):
        row = dict(zip(books["headers"], books["data"][0], strict=True))
        assert row["B / tap position"] > 0 and row["B / token"] > 0


def test_run_ahead_from_the_page_colours_corrections_and_counts_them(demo):
    from gradio_client import Client

    url, _devices = demo
    tokens, _base, books, _plot, what_if, status = generate(
        Client(url, verbose=False), tap_mode="run-ahead"
    ).result()
    row = dict(zip(books["headers"], books["data"][0], strict=True))
    assert {t["class_or_confidence"] for t in tokens} <= {"cloud", "device", "correction"}
    assert row["tokens"] == len(tokens) == 24 and "run-ahead" in status
    assert "corrections" in status and "drafts withdrawn" in status
    assert what_if["data"][-1][0] == "spa run-ahead"


def test_base_never_asks_the_device(demo):
    from gradio_client import Client

    url, _devices = demo
    final = generate(Client(url, verbose=False), setting="base").result()
    tokens, _base, books, *_ = final
    row = dict(zip(books["headers"], books["data"][0], strict=True))
    assert {t["class_or_confidence"] for t in tokens} == {"cloud"}
    assert row["device contacts"] == 0 and row["bytes up"] == 0


def test_errors_are_readable_messages(demo):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, _devices = demo
    client = Client(url, verbose=False)
    with pytest.raises(AppError, match="the prompt is empty"):
        generate(client, prompt="   ").result()
    with pytest.raises(AppError, match="no trained side network"):
        generate(client, user=MY_DEVICE).result()


def test_a_cloud_that_is_not_there_is_a_readable_error(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(CloudUnreachable, match=f"cannot reach the cloud at {url}.*spa cloud"):
        Devices(tmp_path, url)


def test_the_device_tab_trains_with_progress_and_a_loss_curve(demo):
    from gradio_client import Client

    url, devices = demo
    with devices.agent(MY_DEVICE) as agent:
        agent.store.add_items(
            [pair_item(f"Question {i}?", f"Answer {i}, as always.") for i in range(8)]
        )
    train = Client(url, verbose=False).submit(MY_DEVICE, 2, 0.5, "int8", api_name="/train")
    updates = list(train)
    curves = [u[1]["data"] for u in updates]
    assert len(curves[-1]) == 2 * 2  # two epochs, train and validation loss
    assert "trainable parameters" in updates[-1][0]
    final = generate(Client(url, verbose=False), user=MY_DEVICE).result()
    assert len(final[0]) == 24  # the visitor's own device now generates
    assert "taps int8" in final[-1]  # trained on int8 taps, served with int8 taps


def test_the_federated_tab_runs_a_simulation_and_fills_in_rounds(demo):
    """The demo users as Flower devices against the demo's cloud, through `flwr run`."""
    from gradio_client import Client

    url, _devices = demo
    job = Client(url, verbose=False).submit(
        "the demo users", 2, 2, "fedavg", 1, api_name="/federate"
    )
    updates = list(job)
    status, table, plot = updates[-1]
    assert "finished" in status, status
    assert [row[0] for row in table["data"]] == [1, 2]
    columns = table["headers"]
    rouge = [row[columns.index("rouge-l")] for row in table["data"]]
    assert all(r is not None for r in rouge)
    assert {p[1] for p in plot["data"]} == {"personalised", "base"}
    with pytest.raises(Exception, match="has 3 users"):
        Client(url, verbose=False).predict("the demo users", 5, 1, "local", 1, api_name="/federate")


def test_a_browser_sees_cloud_and_device_colours(demo):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: `apt-get install chromium` (make test does)")
    url, _devices = demo
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.goto(url)
            page.get_by_label("user (device)").click()
            page.get_by_role("option", name="Poet Kenji").click()
            page.locator("#prompt textarea").fill("Any tips for a rainy Sunday?")
            page.get_by_label("datacenter").count()  # the page is interactive
            page.locator("#generate").click()
            page.wait_for_function(
                "document.querySelector('#status')?.innerText.includes('shaped by the device')",
                timeout=120_000,
            )
            spans = page.locator("#tokens span.token, #tokens .textspan")
            colours = set(
                spans.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
            )
            page.screenshot(path=str(ARTIFACTS / "generate-tab.png"), full_page=True)
        finally:
            with contextlib.suppress(Exception):
                browser.close()
    assert "rgb(147, 197, 253)" in colours or any("147, 197, 253" in c for c in colours), colours
    assert any("253, 186, 116" in c for c in colours), colours
    assert (ARTIFACTS / "generate-tab.png").stat().st_size > 10_000
