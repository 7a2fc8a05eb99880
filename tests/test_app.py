"""The Gradio demo against a real cloud (uvicorn on 127.0.0.1, tiny backbone): demo users trained
on first start, generation streamed to `gradio_client` with branch labels and live books, the
Device tab's training, readable errors, and a real headless Chromium that sees both colours."""

from __future__ import annotations

import contextlib
import html
import os
import re
import threading
import time
from pathlib import Path

import pytest
from cloud_server import free_port, running

from app import demo_catalogue
from app.devices import MY_DEVICE, DemoConfig, Devices
from app.ui import build
from device_agent.errors import CloudUnreachable
from device_agent.history import pair_item
from personalization.config import DEFAULT_TAP_ENCODING

pytestmark = pytest.mark.timeout(300)

CHROMIUM = os.environ.get("SPA_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("SPA_TEST_ARTIFACTS", "test-artifacts"))

WHAT_IF_ROWS = ["base", "lora", "adapter", "lst", "full", "choice", "spa", "spa run-ahead"]


def shop_target(directory: Path) -> tuple[Path, Path, Path]:
    """The demo's own shop (no shared data) and a code target trained on it, as `spa demo`
    trains one: (catalogue, histories, checkpoint)."""
    from personalization.atspeed.code_target import CodeTargetConfig, train_code_target
    from personalization.atspeed.codes import cached_codes
    from personalization.atspeed.split import load_users
    from personalization.backbone.loading import load_backbone

    items, histories = demo_catalogue.write(directory / "shop")
    codes = cached_codes(demo_catalogue.titles())
    cfg = CodeTargetConfig(epochs=2, reduction=4)
    out = directory / "shop" / "target.safetensors"
    train_code_target(
        load_backbone("tiny-llama"), codes, load_users(histories), cfg, out=out, progress=False
    )
    return items, histories, out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(page URL, Devices): the whole demo on the tiny backbone, stopped at the end."""
    directory = tmp_path_factory.mktemp("demo")
    items, histories, target = shop_target(directory)
    with running(directory, catalogue=items, recommend_target=str(target)) as server:
        devices = Devices(directory, server.url, DemoConfig(epochs=3, calibration_prompts=2))
        assert devices.prepare() == ["pirate", "chef", "haiku"]
        page = build(devices, directory, histories)
        port = free_port()
        page.queue().launch(
            server_name="127.0.0.1",
            server_port=port,
            prevent_thread_lock=True,
            ssr_mode=False,
            quiet=True,
        )
        try:
            yield f"http://127.0.0.1:{port}/", devices
        finally:
            page.close()


def generate(client, user="haiku", prompt="Any tips for a rainy Sunday?", setting="spa", **kw):
    args = (
        dict(
            decoding="greedy",
            net="datacenter",
            calibrated=True,
            threshold=0.5,
            max_tokens=24,
            seed=0,
            beams=4,
            tap_mode="pull",
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
        )
        | kw
    )
    return client.submit(user, prompt, setting, *args.values(), api_name="/generate")


OUTPUTS = ("text", "base", "books", "plot", "what_if", "status", "data")


def outputs(update) -> dict:
    """One update of the Generate tab, by name; `tokens` / `base_tokens`: the token data."""
    named = dict(zip(OUTPUTS, update, strict=True))
    return named | {"tokens": named["data"]["personalised"], "base_tokens": named["data"]["base"]}


def books_row(books: dict) -> dict:
    return dict(zip(books["headers"], books["data"][0], strict=True))


def test_first_start_trains_the_demo_users_once(demo):
    _url, devices = demo
    assert devices.prepare() == []  # cached: a second start trains nothing
    for key in ("pirate", "chef", "haiku"):
        with devices.agent(key) as agent:
            checkpoint = agent.store.current_checkpoint("spa")
            assert checkpoint is not None and checkpoint.usage is not None
            assert len(agent.store.items()) == 40


def test_demo_users_train_beside_the_page_and_say_where_they_are(demo, tmp_path):
    """`spa demo` serves the page first and trains the demo users beside it: meanwhile each
    user says where its training is (the page shows it instead of an answer)."""
    _url, devices = demo
    fresh = Devices(tmp_path, devices.cloud_url, DemoConfig(epochs=3, calibration_prompts=2))
    trained: list[list[str]] = []
    thread = threading.Thread(target=lambda: trained.append(fresh.prepare()))
    thread.start()
    states = set()
    while thread.is_alive():
        states.add(fresh.training("haiku"))
        time.sleep(0.02)
    thread.join()
    assert trained == [["pirate", "chef", "haiku"]]
    assert "waiting for its turn" in states, states
    assert any(s and s.startswith("epoch ") and s.endswith("/3") for s in states), states
    assert all(fresh.training(k) is None for k in fresh.users())


def test_generation_streams_tokens_with_branches_and_books(demo):
    from gradio_client import Client

    url, _devices = demo
    job = generate(Client(url, verbose=False))
    updates = [outputs(u) for u in job]
    streaming = [u for u in updates if u["status"].startswith("generating")]
    # one update per personalised token, each one token longer than the last, books growing
    lengths = [len(u["tokens"]) for u in streaming]
    assert lengths == list(range(1, 25))
    assert [u["text"].count("data-branch=") for u in streaming] == lengths  # the flowing text
    counted = [u["books"]["data"][0][0] for u in streaming]
    assert counted == lengths  # the books' token count follows the stream
    final = updates[-1]
    tokens, text, status = final["tokens"], final["text"], final["status"]
    branches = {t["branch"] for t in tokens}
    assert branches <= {"cloud", "device", "fallback"} and "device" in branches
    assert final["base_tokens"] and {t["branch"] for t in final["base_tokens"]} == {"cloud"}
    # flowing text: every token a span with its branch's colour and its gate probability
    assert "".join(t["text"] for t in tokens) in html.unescape(re.sub("<[^>]+>", "", text))
    for t in tokens:
        assert f'data-branch="{t["branch"]}" title="{t["branch"]} · p(device) = ' in text
        assert 0 <= t["gate_prob"] <= 1
    row = books_row(final["books"])
    device_tokens = sum(t["branch"] == "device" for t in tokens)
    assert row["tokens"] == 24 and row["device contacts"] >= device_tokens > 0
    assert row["bytes down"] > 0 and row["bytes up"] > 0
    parts = row["T_cloud ms"] + row["T_device ms"] + row["T_net ms"]
    assert row["T_total ms"] == pytest.approx(parts, abs=0.2)
    assert len(final["plot"]["data"]) == 3 * 24  # every token, split in cloud / device / network
    what_if = final["what_if"]["data"]
    assert [r[0] for r in what_if] == WHAT_IF_ROWS
    assert what_if[0][5] == 0 and what_if[0][3] == 0  # base: no contacts, no network time
    assert f"{device_tokens} shaped by the device" in status


def test_repetition_options_reach_the_cloud_and_change_the_answer(demo):
    """The page's repetition controls decode as transformers' processors: with no-repeat 2 no
    token bigram occurs twice in prompt + answer, and the answer differs from the one without."""
    from gradio_client import Client

    url, _devices = demo
    client = Client(url, verbose=False)
    plain = outputs(generate(client, setting="base").result())["tokens"]
    controlled = outputs(
        generate(client, setting="base", repetition_penalty=1.5, no_repeat_ngram_size=2).result()
    )["tokens"]
    assert [t["id"] for t in controlled] != [t["id"] for t in plain]
    ids = [t["id"] for t in controlled]
    bigrams = list(zip(ids, ids[1:], strict=False))
    assert len(bigrams) == len(set(bigrams)) > 0
    with pytest.raises(Exception, match="-1 is less than minimum value 0"):
        generate(client, no_repeat_ngram_size=-1).result()


def test_beam_search_through_the_cloud(demo):
    from gradio_client import Client

    url, _devices = demo
    final = outputs(list(generate(Client(url, verbose=False), decoding="beam", beams=3))[-1])
    row, tokens = books_row(final["books"]), final["tokens"]
    assert 0 < len(tokens) <= 24 and row["tokens"] == len(tokens) and final["base_tokens"]
    assert row["device contacts"] > 0 and "shaped by the device" in final["status"]


def test_streamed_taps_give_the_same_answer_and_show_their_bytes(demo):
    from gradio_client import Client

    url, _devices = demo
    client = Client(url, verbose=False)
    pull = outputs(generate(client, tap_mode="pull").result())
    streamed = outputs(generate(client, tap_mode="streamed").result())
    assert streamed["text"] == pull["text"]  # the same tokens, the same colours
    encoding = DEFAULT_TAP_ENCODING  # the demo devices' encoding
    assert f"{encoding} (streamed)" in streamed["status"]
    assert f"{encoding} (pull)" in pull["status"]
    for run in (pull, streamed):
        row = books_row(run["books"])
        assert row["B / tap position"] > 0 and row["B / token"] > 0


def test_run_ahead_from_the_page_colours_corrections_and_counts_them(demo):
    from gradio_client import Client

    url, _devices = demo
    final = outputs(generate(Client(url, verbose=False), tap_mode="run-ahead").result())
    row, tokens, status = books_row(final["books"]), final["tokens"], final["status"]
    assert {t["branch"] for t in tokens} <= {"cloud", "device", "correction"}
    assert row["tokens"] == len(tokens) == 24 and "run-ahead" in status
    assert "corrections" in status and "drafts withdrawn" in status
    assert final["what_if"]["data"][-1][0] == "spa run-ahead"


def test_base_never_asks_the_device(demo):
    from gradio_client import Client

    url, _devices = demo
    final = outputs(generate(Client(url, verbose=False), setting="base").result())
    row = books_row(final["books"])
    assert {t["branch"] for t in final["tokens"]} == {"cloud"}
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


#: (endpoint, arguments, a fragment of the readable message): bad values in the page's fields
UI_CASES = [
    ("/generate", {"user": "nobody"}, "nobody"),
    ("/generate", {"setting": "magic"}, "magic"),
    ("/generate", {"decoding": "psychic"}, "psychic"),
    ("/generate", {"net": "moon"}, "moon"),
    ("/generate", {"tap_mode": "teleport"}, "teleport"),
    ("/generate", {"max_tokens": 0}, "0 is less than minimum value 8"),
    ("/generate", {"max_tokens": 1000}, "1000 is greater than maximum value 128"),
    ("/generate", {"repetition_penalty": 9}, "9 is greater than maximum value 2"),
    ("/train", ["pirate", 0, 0.5, "int8"], "0 is less than minimum value 1"),
    ("/train", ["pirate", 2, 3.0, "int8"], "3.0 is greater than maximum value 1"),
    ("/train", ["pirate", 2, 0.5, "zip"], "zip"),
    ("/delete_items", ["pirate", "three"], "ids must be whole numbers"),
    ("/delete_items", ["pirate", " "], "give the ids of the items to delete"),
]


@pytest.mark.parametrize(("endpoint", "args", "message"), UI_CASES)
def test_a_bad_field_is_a_readable_message(demo, endpoint, args, message):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, _devices = demo
    client = Client(url, verbose=False)
    with pytest.raises((AppError, ValueError)) as refused:
        if endpoint == "/generate":
            generate(client, **args).result()
        else:
            client.predict(*args, api_name=endpoint)
    text = str(refused.value)
    assert message in text and "Traceback" not in text, text


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
    final = outputs(generate(Client(url, verbose=False), user=MY_DEVICE).result())
    assert len(final["tokens"]) == 24  # the visitor's own device now generates
    assert "taps int8" in final["status"]  # trained on int8 taps, served with int8 taps


CATALOGUE = demo_catalogue.titles()  # the shop the demo ships: no shared data needed
TYPED_HISTORY = "Lumen Rose Shampoo, 1 oz\nLumen Rose Conditioner, 1 oz"


def test_the_recommend_tab_shows_beam_and_speculative_search_side_by_side(demo):
    from gradio_client import Client

    from app.ui.recommend import TYPED

    client = Client(demo[0], verbose=False)
    status, beam, spec = client.predict(TYPED, TYPED_HISTORY, 4, 2, api_name="/recommend")
    assert "speed-up" in status and "same items: yes" in status and "target.safetensors" in status
    assert beam["headers"] == ["#", "item", "code", "log-prob"]
    titles = [row[1] for row in beam["data"]]
    assert len(titles) == 4 and set(titles) <= set(CATALOGUE)
    assert all(re.fullmatch(r"(<[a-d]_\d+>){4}", row[2]) for row in beam["data"])
    assert [row[1:3] for row in spec["data"]] == [row[1:3] for row in beam["data"]]  # strict
    # a shopper of the shop: their later purchases are the truth, marked when recommended
    first = demo_catalogue.shoppers()[0]
    history = "\n".join(first["history"] + first["valid"])
    status, beam, _ = client.predict(first["user_id"], history, 10, 3, api_name="/recommend")
    assert "later purchases recommended" in status, status
    # bad input: a message in the page, never a bare "Error"
    with pytest.raises(Exception, match="purchase history"):
        client.predict(TYPED, "  ", 4, 2, api_name="/recommend")
    status, beam, spec = client.predict(
        TYPED, "Lumen Rose Shampoo, 1 oz\nno such cream", 4, 2, api_name="/recommend"
    )
    assert "cannot recommend" in status and "not in the catalogue: 'no such cream'" in status
    assert beam is None or not beam.get("data")


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
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.goto(url)
            page.get_by_label("user (device)").click()
            page.get_by_role("option", name="Poet Kenji").click()
            page.wait_for_function(  # the user's first example prompt fills the box first
                "document.querySelector('#prompt textarea').value.includes('learn to code')"
            )
            page.locator("#prompt textarea").fill("Any tips for a rainy Sunday?")
            page.get_by_label("datacenter").count()  # the page is interactive
            page.locator("#generate").click()
            page.wait_for_function(
                "document.querySelector('#status')?.innerText.includes('shaped by the device')",
                timeout=120_000,
            )
            spans = page.locator("#tokens span.tok")
            colours = set(
                spans.evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
            )
            # flowing text: the spans sit inline in one block, not as separate chips
            displays = set(spans.evaluate_all("els => els.map(e => getComputedStyle(e).display)"))
            text = page.locator("#tokens .spa-text").inner_text()  # one block of text
            device = page.locator('#tokens span.tok[data-branch="device"]').first
            device.hover()
            hover = device.get_attribute("title")
            outline = device.evaluate("e => getComputedStyle(e).outlineStyle")
            # the repetition options are on the page, with the demo's defaults
            page.get_by_text("repetition (transformers' logits processors)").click()
            penalty = page.locator("#penalty input[type=number]").input_value()
            no_repeat = page.locator("#no-repeat input[type=number]").input_value()
            page.screenshot(path=str(ARTIFACTS / "generate-tab.png"), full_page=True)
            # the Recommend tab: a typed history, both searches side by side
            page.get_by_role("tab", name="Recommend").click()
            page.locator("#rec-history textarea").fill(TYPED_HISTORY)
            page.locator("#recommend").click()
            page.wait_for_function(
                "document.querySelector('#rec-status')?.innerText.includes('speed-up')",
                timeout=120_000,
            )
            recommended = page.locator("#rec-status").inner_text()
            shown = page.locator("#rec-beam").inner_text().splitlines()
        finally:
            with contextlib.suppress(Exception):
                browser.close()
    assert any("147, 197, 253" in c for c in colours), colours  # cloud
    assert any("253, 186, 116" in c for c in colours), colours  # device
    assert displays == {"inline"} and text.strip(), (displays, text)
    assert re.fullmatch(r"device · p\(device\) = [01]\.\d\d", hover), hover
    assert outline == "solid"  # the hovered token is outlined
    assert (float(penalty), int(no_repeat)) == (1.0, 3)
    assert (ARTIFACTS / "generate-tab.png").stat().st_size > 10_000
    assert "same items: yes" in recommended, recommended
    assert sum(line in CATALOGUE for line in shown) == 10, shown  # K = 10 items on screen
    assert sum(bool(re.fullmatch(r"(<[a-d]_\d+>){4}", line)) for line in shown) == 10, shown
