"""The Generate tab: tokens stream one by one, each coloured by the branch that produced it, while
the latency books fill in; then the backbone alone answers the same prompt for comparison, and
the measured costs become the what-if table of every setting under the chosen network."""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr
import pandas as pd

from app.devices import Devices
from app.ui.common import BRANCH_COLORS, readable
from device_agent.generation import Accounts, RemoteGeneration, TokenCost
from personalization.config import SERVED_SETTINGS, STRATEGIES, TAP_MODES, DecodeConfig
from personalization.latency import PROFILES, profile

#: the decoding strategies a session serves, by the label the page shows
DECODINGS = {{"sample": "sampling"}.get(s, s): s for s in STRATEGIES}
BOOKS = ["tokens", "tokens/s", "M", "device contacts", "bytes up", "bytes down",
         "B / tap position", "B / token", "T_cloud ms", "T_device ms", "T_net ms",
         "T_total ms"]  # fmt: skip
WHAT_IF = ["setting", "% params", "inference ms", "network ms", "total ms / token", "M"]
PARTS = {"cloud": "cloud_s", "device": "device_s", "network": "net_s"}
PART_COLORS = {"cloud": "#3b82f6", "device": "#f97316", "network": "#9ca3af"}


def books_frame(a: Accounts) -> pd.DataFrame:
    """The live accounting panel: one row, the sums of the per-token bills so far."""
    row = [a.tokens, round(a.tokens_per_s, 1), round(a.m, 2), a.contacts, a.bytes_up,
           a.bytes_down, round(a.bytes_down / a.positions) if a.positions else 0,
           round((a.bytes_up + a.bytes_down) / a.tokens) if a.tokens else 0,
           *(round(1e3 * t, 1) for t in (a.t_cloud, a.t_device, a.t_net,
                                         a.t_total))]  # fmt: skip
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


def highlighted(generation: RemoteGeneration) -> list[tuple[str, str]]:
    return [(t.text, t.branch) for t in generation.tokens]


def build(devices: Devices) -> gr.Dropdown:
    """The tab's components and events, inside the caller's `gr.Blocks`; returns the user
    chooser (the Device tab acts on the same user)."""
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            user = gr.Dropdown(
                [(devices.label(k), k) for k in devices.users()], value=devices.users()[0],
                label="user (device)",
            )  # fmt: skip
            prompt = gr.Textbox(
                devices.example_prompt(devices.users()[0]), label="prompt", lines=3,
                elem_id="prompt",
            )  # fmt: skip
            setting = gr.Radio(list(SERVED_SETTINGS), value="spa", label="setting")
            decoding = gr.Radio(list(DECODINGS), value="greedy", label="decoding")
            net = gr.Dropdown(list(PROFILES), value="lte", label="network profile")
            tap_mode = gr.Radio(
                list(TAP_MODES), value="pull", label="taps: pull (with each contact), streamed "
                "(pushed as they exist), or run-ahead (the backbone drafts without waiting, the "
                "device corrects; spa only) — greedy and sampling; beam search always pulls",
            )  # fmt: skip
            with gr.Accordion("gate and length", open=False):
                calibrated = gr.Checkbox(
                    True, label="gate threshold calibrated to the device's usage budget"
                )
                threshold = gr.Slider(0, 1, 0.5, step=0.01, label="gate threshold σ (if not)")
                max_tokens = gr.Slider(8, 128, 48, step=1, label="max new tokens")
                seed = gr.Number(0, precision=0, label="sampling seed")
                beams = gr.Slider(2, 8, 4, step=1, label="beams (beam search: the tokens arrive "
                                  "when the search ends)")  # fmt: skip
            run = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=2):
            tokens = gr.HighlightedText(
                label="personalised (cloud + device)", color_map=BRANCH_COLORS,
                show_legend=True, show_inline_category=False, elem_id="tokens",
            )  # fmt: skip
            base = gr.HighlightedText(
                label="backbone alone (base), for comparison", color_map=BRANCH_COLORS,
                show_inline_category=False, elem_id="base",
            )  # fmt: skip
            books = gr.Dataframe(books_frame(Accounts()), label="books (live)", elem_id="books")
            plot = gr.BarPlot(
                latency_frame([]), x="token", y="ms",
                color="part", color_map=PART_COLORS, title="latency per token, by part", height=300,
            )  # fmt: skip
            what_if = gr.Dataframe(
                headers=WHAT_IF, label="what-if: every setting under this network (paper Table 2)"
            )
            status = gr.Markdown(elem_id="status")

    user.change(lambda k: devices.example_prompt(k), user, prompt)

    @readable
    def generate(
        key: str, text: str, setting: str, decoding: str, net: str, calibrated: bool,
        threshold: float, max_tokens: float, seed: float, beams: float = 4,
        tap_mode: str = "pull",
    ) -> Iterator[tuple]:  # fmt: skip
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
        )
        with devices.lock(key), devices.agent(key, link) as agent:
            mine = agent.generate(
                text, setting=setting, decode=decode,
                threshold=None if calibrated else float(threshold),
                tap_mode=None if decoding == "beam" else tap_mode,
            )  # fmt: skip
            what = f"**{setting}** over an emulated **{net}** link"
            if mine.model is not None:
                mode = "pull" if decoding == "beam" else tap_mode
                what += f", taps {mine.model.config.tap_encoding} ({mode})"
            for _ in mine:
                live = books_frame(mine.accounts), latency_frame(mine.tokens)
                yield highlighted(mine), [], *live, None, f"generating ({what}) …"
            table = [[r.setting, round(r.parameters_pct, 3), round(r.inference_ms, 1),
                      round(r.network_ms, 1), round(r.total_ms, 1), round(r.m, 2)]
                     for r in agent.what_if(mine, link)] if setting != "base" else None  # fmt: skip
            a = mine.accounts
            done = (
                f"{what}: {a.tokens} tokens, {a.device_tokens} shaped by the device, M = {a.m:.2f}"
            )
            if mine.tap_mode == "run-ahead":
                done += f", {a.corrections} corrections, {a.withdrawn} drafts withdrawn"
            frames = (
                highlighted(mine),
                books_frame(mine.accounts),
                latency_frame(mine.tokens),
                table,
            )
            if setting == "base":
                yield frames[0], [], *frames[1:], done
                return
            alone = agent.generate(text, setting="base", decode=decode)
            for _ in alone:
                yield frames[0], highlighted(alone), *frames[1:], done + " · base answering …"
            yield frames[0], highlighted(alone), *frames[1:], done

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
        ],  # fmt: skip
        [tokens, base, books, plot, what_if, status],
        api_name="generate",
    )
    return user
