"""The Gradio demo: Generate (branch-coloured tokens, live latency books), Device (history,
training), Federated (a Flower simulation), Recommend (next items: beam vs speculative search).
`build` makes the page for a set of `Devices`."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from app.devices import Devices
from app.ui import device, federated, generate, recommend

INTRO = """# SPA — Side Plugin Adaption
A frozen backbone answers in the **cloud**; each user's **device** keeps a small private side
network trained on their own history; a per-token gate asks the device only when it matters.
Tokens are coloured by who produced them: <span style="background:#93c5fd">cloud</span> (the
backbone alone), <span style="background:#fdba74">device</span> (backbone + the user's side
network), <span style="background:#c4b5fd">correction</span> (run-ahead: the device replaced
the backbone's draft), <span style="background:#fca5a5">fallback</span> (the device missed its
deadline; run-ahead: a draft the device could no longer correct). Hover a token for the gate's
probability that the device should shape it.
Backbone: **{backbone}** · cloud: `{cloud}`"""


def build(devices: Devices, root: Path, histories: Path | None = None) -> gr.Blocks:
    """The page; `histories` (Beauty format) lists the Recommend tab's shoppers."""
    with gr.Blocks(title="SPA demo") as page:
        gr.Markdown(INTRO.format(backbone=devices.backbone, cloud=devices.cloud_url))
        with gr.Tab("Generate"):
            user = generate.build(devices)
        with gr.Tab("Device"):
            device.build(devices, user, page)
        with gr.Tab("Federated"):
            federated.build(devices, root)
        with gr.Tab("Recommend"):
            recommend.build(devices, histories)
    return page
