"""The Generate tab: the answer streams in as flowing text, each token coloured by the branch that
produced it (hover: the gate's probability), while the latency books fill in; then the backbone
alone answers the same prompt for comparison, and the measured costs become the what-if table of
every setting — `base` first — under the chosen network."""

from __future__ import annotations

import html
import time
from collections.abc import Iterator

import gradio as gr
import pandas as pd

from app.devices import DemoDecoding, Devices
from app.ui.common import BRANCH_COLORS, readable
from device_agent.generation import Accounts, RemoteGeneration, TokenCost
from personalization.config import SERVED_SETTINGS, STRATEGIES, TAP_MODES, DecodeConfig
from personalization.latency import PROFILES, profile

#: the decoding strategies a session serves, by the label the page shows
DECODINGS = {{"sample": "sampling"}.get(s, s): s for s in STRATEGIES}
BOOKS = [
    "tokens",
    "tokens/s",
    "M",
    "device contacts",
    "bytes up",
    "bytes down",
    "B / tap position",
    "B / token",
    "T_cloud ms",
    "T_device ms",
    "T_net ms",
    "T_total ms",
]
WHAT_IF = ["setting", "% params", "inference ms", "network ms", "total ms / token", "M"]
PARTS = {"cloud": "cloud_s", "device": "device_s", "network": "net_s"}
PART_COLORS = {"cloud": "#3b82f6", "device": "#f97316", "network": "#9ca3af"}


def books_frame(a: Accounts) -> pd.DataFrame:
    """The live accounting panel: one row, the sums of the per-token bills so far."""
    row = [
        a.tokens,
        round(a.tokens_per_s, 1),
        round(a.m, 2),
        a.contacts,
        a.bytes_from_device,
        a.bytes_to_device,
        round(a.bytes_to_device / a.tap_positions) if a.tap_positions else 0,
        round((a.bytes_from_device + a.bytes_to_device) / a.tokens) if a.tokens else 0,
        *(round(1e3 * t, 1) for t in (a.t_cloud, a.t_device, a.t_net, a.t_total)),
    ]
    return pd.DataFrame([row], columns=BOOKS)


def latency_frame(tokens: list[TokenCost]) -> pd.DataFrame:
    """Per token, its latency split by part (every part on every token: a streamed plot fixes
    its series from the first frame)."""
    rows = [
        {"token": t.index, "part": part, "ms": 1e3 * getattr(t, attr)}
        for t in tokens
        for part, attr in PARTS.items()
    ]
    return pd.DataFrame(rows or [{"token": 0, "part": p, "ms": 0.0} for p in PARTS])


def token_data(generation: RemoteGeneration | None) -> list[dict]:
    """The tokens as data (the API's view of the coloured text)."""
    if generation is None:
        return []
    return [
        {"id": t.id, "text": t.text, "branch": t.branch, "gate_prob": t.gate_prob}
        for t in generation.tokens
    ]


def flowing(generation: RemoteGeneration | None) -> str:
    """The answer as flowing text: one coloured span per token, its branch and gate probability
    in the hover, line breaks kept."""
    if generation is None or not generation.tokens:
        return '<div class="spa-text"></div>'
    spans = []
    for t in generation.tokens:
        tip = t.branch if t.gate_prob is None else f"{t.branch} · p(device) = {t.gate_prob:.2f}"
        spans.append(
            f'<span class="tok" data-branch="{t.branch}" title="{tip}" '
            f'style="background:{BRANCH_COLORS.get(t.branch, "#e5e7eb")}">{html.escape(t.text)}'
            "</span>"
        )
    return f'<div class="spa-text" style="{TEXT_STYLE}">{"".join(spans)}</div>'


TEXT_STYLE = "white-space: pre-wrap; line-height: 1.8; font-size: 1.05em; padding: 6px 2px"
HOVER_CSS = ".tok { border-radius: 3px; } .tok:hover { outline: 2px solid #374151; }"


def text_panel(label: str, elem_id: str) -> gr.HTML:
    return gr.HTML(
        flowing(None),
        label=label,
        show_label=True,
        container=True,
        elem_id=elem_id,
        css_template=HOVER_CSS,
        min_height=60,
    )


def build(devices: Devices, defaults: DemoDecoding | None = None) -> gr.Dropdown:
    """The tab's components and events, inside the caller's `gr.Blocks`; returns the user
    chooser (the Device tab acts on the same user)."""
    defaults = defaults or DemoDecoding()
    first = devices.users()[0]
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            user = gr.Dropdown(
                [(devices.label(k), k) for k in devices.users()], value=first, label="user (device)"
            )
            examples = gr.Dropdown(
                devices.example_prompts(first),
                value=None,
                label="example prompts",
                elem_id="examples",
            )
            prompt = gr.Textbox(
                devices.example_prompt(first), label="prompt", lines=3, elem_id="prompt"
            )
            setting = gr.Radio(list(SERVED_SETTINGS), value="spa", label="setting")
            decoding = gr.Radio(list(DECODINGS), value="greedy", label="decoding")
            net = gr.Dropdown(list(PROFILES), value="lte", label="network profile")
            tap_mode = gr.Radio(
                list(TAP_MODES),
                value="pull",
                label="taps: pull (with each contact), streamed "
                "(pushed as they exist), or run-ahead (the backbone drafts without waiting, the "
                "device corrects; spa only) — greedy and sampling; beam search always pulls",
            )
            with gr.Accordion("repetition (transformers' logits processors)", open=False):
                penalty = gr.Slider(
                    1.0,
                    2.0,
                    defaults.repetition_penalty,
                    step=0.05,
                    elem_id="penalty",
                    label="repetition penalty (> 1 discourages tokens already used)",
                )
                no_repeat = gr.Slider(
                    0,
                    8,
                    defaults.no_repeat_ngram_size,
                    step=1,
                    elem_id="no-repeat",
                    label="no-repeat n-gram size (0: off; n: no n tokens occur twice)",
                )
            with gr.Accordion("gate and length", open=False):
                calibrated = gr.Checkbox(
                    True, label="gate threshold calibrated to the device's usage budget"
                )
                threshold = gr.Slider(0, 1, 0.5, step=0.01, label="gate threshold σ (if not)")
                max_tokens = gr.Slider(8, 128, 48, step=1, label="max new tokens")
                seed = gr.Number(0, precision=0, label="sampling seed")
                beams = gr.Slider(
                    2,
                    8,
                    4,
                    step=1,
                    label="beams (beam search: the tokens arrive when the search ends)",
                )
            run = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=2):
            tokens = text_panel(
                "personalised (cloud + device): hover a token for its gate", "tokens"
            )
            base = text_panel("backbone alone (base), for comparison", "base")
            books = gr.Dataframe(books_frame(Accounts()), label="books (live)", elem_id="books")
            plot = gr.BarPlot(
                latency_frame([]),
                x="token",
                y="ms",
                color="part",
                color_map=PART_COLORS,
                title="latency per token, by part",
                height=300,
            )
            what_if = gr.Dataframe(
                headers=WHAT_IF, label="what-if: every setting under this network (paper Table 2)"
            )
            status = gr.Markdown(elem_id="status")
            with gr.Accordion("tokens as data", open=False):
                data = gr.JSON(label="per token: text, branch, gate probability", elem_id="data")

    user.change(
        lambda k: (
            gr.update(choices=devices.example_prompts(k), value=None),
            devices.example_prompt(k),
        ),
        user,
        [examples, prompt],
    )
    examples.change(lambda p: p if p else gr.skip(), examples, prompt)

    @readable
    def generate(
        key: str,
        text: str,
        setting: str,
        decoding: str,
        net: str,
        calibrated: bool,
        threshold: float,
        max_tokens: float,
        seed: float,
        beams: float = 4,
        tap_mode: str = "pull",
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: float = 0,
    ) -> Iterator[tuple]:
        if not text or not text.strip():
            raise gr.Error("the prompt is empty: type something to ask")
        if decoding not in DECODINGS:
            raise gr.Error(f"unknown decoding {decoding!r}: {', '.join(DECODINGS)}")
        link = profile(net)
        decode = DecodeConfig(
            strategy=DECODINGS[decoding],
            max_new_tokens=int(max_tokens),
            seed=int(seed) if decoding == "sampling" else None,
            num_beams=int(beams),
            repetition_penalty=float(repetition_penalty),
            no_repeat_ngram_size=int(no_repeat_ngram_size),
        )
        while (state := devices.training(key)) is not None:  # first start: trained beside the page
            yield (
                flowing(None),
                flowing(None),
                books_frame(Accounts()),
                latency_frame([]),
                None,
                f"{devices.label(key).split(' — ')[0]}'s side network is still training "
                f"({state}); the answer starts when it is ready …",
                {"personalised": [], "base": []},
            )
            time.sleep(1)
        with devices.lock(key), devices.agent(key, link) as agent:
            mine = agent.generate(
                text,
                setting=setting,
                decode=decode,
                threshold=None if calibrated else float(threshold),
                tap_mode=None if decoding == "beam" else tap_mode,
            )
            what = f"**{setting}** over an emulated **{net}** link"
            if mine.model is not None:
                mode = "pull" if decoding == "beam" else tap_mode
                what += f", taps {mine.model.config.tap_encoding} ({mode})"
            for _ in mine:
                live = books_frame(mine.accounts), latency_frame(mine.tokens)
                data = {"personalised": token_data(mine), "base": []}
                yield flowing(mine), flowing(None), *live, None, f"generating ({what}) …", data
            table = (
                [
                    [
                        r.setting,
                        round(r.parameters_pct, 3),
                        round(r.inference_ms, 1),
                        round(r.network_ms, 1),
                        round(r.total_ms, 1),
                        round(r.m, 2),
                    ]
                    for r in agent.what_if(mine, link)
                ]
                if setting != "base"
                else None
            )
            a = mine.accounts
            done = (
                f"{what}: {a.tokens} tokens, {a.device_tokens} shaped by the device, M = {a.m:.2f}"
            )
            if mine.tap_mode == "run-ahead":
                done += f", {a.corrections} corrections, {a.withdrawn} drafts withdrawn"
            frames = (books_frame(mine.accounts), latency_frame(mine.tokens), table)
            if setting == "base":
                data = {"personalised": token_data(mine), "base": []}
                yield flowing(mine), flowing(None), *frames, done, data
                return
            alone = agent.generate(text, setting="base", decode=decode)
            for _ in alone:
                data = {"personalised": token_data(mine), "base": token_data(alone)}
                yield flowing(mine), flowing(alone), *frames, done + " · base answering …", data
            yield flowing(mine), flowing(alone), *frames, done, data

    run.click(
        generate,
        [
            user,
            prompt,
            setting,
            decoding,
            net,
            calibrated,
            threshold,
            max_tokens,
            seed,
            beams,
            tap_mode,
            penalty,
            no_repeat,
        ],
        [tokens, base, books, plot, what_if, status, data],
        api_name="generate",
    )
    return user
