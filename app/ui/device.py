"""The Device tab: the chosen user's private history (view, add, delete, import), training
against the cloud with a progress bar and a live loss curve, and the current checkpoint's facts.
Everything here stays in the device's own store; only training features cross to the cloud."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import gradio as gr
import pandas as pd

from app.devices import Devices
from app.ui.common import readable
from device_agent.agent import DeviceAgent
from device_agent.history import pair_item, read_items, text_item
from device_agent.trainer import Progress
from personalization.config import DEFAULT_TAP_ENCODING, TAP_ENCODINGS

HISTORY = ["id", "prompt", "response", "source"]


def history_frame(agent: DeviceAgent) -> pd.DataFrame:
    rows = [
        [i.id, "" if i.kind == "text" else i.instruction, i.output, i.source]
        for i in agent.store.items()
    ]
    return pd.DataFrame(rows, columns=HISTORY)


def facts(agent: DeviceAgent) -> str:
    """The current checkpoint in a few lines (Markdown)."""
    s = agent.status()
    c, run = s["checkpoint"], s["last_run"]
    lines = [f"**{s['name']}** · {s['history_items']} history items · {s['runs']} training runs"]
    if c is None:
        lines.append("no trained side network yet: add history and press **Train**")
    else:
        usage = "–" if c["usage"] is None else f"{c['usage']:.2f}"
        budget = "–" if c["target_usage"] is None else f"{c['target_usage']:.2f}"
        threshold = "–" if c["threshold"] is None else f"{c['threshold']:.3f}"
        lines.append(
            f"checkpoint `{c['path']}` (setting **{c['setting']}**): {c['parameters']:,} "
            f"trainable parameters = {c['parameters_pct']:.3f} % of the backbone · usage budget "
            f"{budget} (measured {usage}) · gate threshold {threshold}"
        )
    if run and run["status"] == "failed":
        lines.append(f"last run failed: {run['error']}")
    return "\n\n".join(lines)


def loss_frame(epochs: list[dict]) -> pd.DataFrame:
    """Train and validation LM loss per epoch (both series in every frame)."""
    rows = []
    for row in epochs:
        valid = row.get("valid", {}).get("lm")
        rows.append({"epoch": row["epoch"], "split": "train", "loss": row["train"]["lm"]})
        rows.append({"epoch": row["epoch"], "split": "validation", "loss": valid})
    return pd.DataFrame(
        rows or [{"epoch": 0, "split": s, "loss": None} for s in ("train", "validation")]
    )


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise gr.Error(
            f"ids must be whole numbers separated by commas or spaces, not {text!r}"
        ) from None
    if not ids:
        raise gr.Error("give the ids of the items to delete (see the table)")
    return ids


def build(devices: Devices, user: gr.Dropdown, page: gr.Blocks) -> None:
    """The tab's components; `user` is the device chosen in the Generate tab."""
    info = gr.Markdown(elem_id="device-facts")
    history = gr.Dataframe(headers=HISTORY, label="local history (private)", wrap=True)
    with gr.Row():
        prompt = gr.Textbox(label="prompt (empty: a free-text note)", lines=2)
        response = gr.Textbox(label="your response / note", lines=2)
        add = gr.Button("Add")
    with gr.Row():
        ids = gr.Textbox(label="delete items (ids)", placeholder="3, 5")
        delete = gr.Button("Delete")
        upload = gr.File(label="import JSONL", file_types=[".jsonl"], type="filepath")
    with gr.Row():
        epochs = gr.Slider(1, 60, devices.config.epochs, step=1, label="epochs")
        budget = gr.Slider(
            0.05,
            1,
            devices.config.target_usage,
            step=0.05,
            label="usage budget (share of tokens the device shapes)",
        )
        encoding = gr.Dropdown(
            list(TAP_ENCODINGS),
            value=devices.config.tap_encoding,
            label="tap encoding (the side network trains on taps as they will arrive)",
        )
        train = gr.Button("Train", variant="primary")
    curve = gr.LinePlot(
        loss_frame([]), x="epoch", y="loss", color="split", title="training loss (live)", height=300
    )

    @readable
    def show(key: str):
        if (state := devices.training(key)) is not None:
            return f"**{devices.label(key)}**: training its side network ({state}) …", gr.skip()
        with devices.lock(key), devices.agent(key) as agent:
            return facts(agent), history_frame(agent)

    @readable
    def add_item(key: str, p: str, r: str):
        item = pair_item(p, r) if p.strip() else text_item(r)
        with devices.lock(key), devices.agent(key) as agent:
            agent.store.add_items([item])
            gr.Info("added to the local history; train to use it")
            return facts(agent), history_frame(agent), "", ""

    @readable
    def delete_items(key: str, text: str):
        with devices.lock(key), devices.agent(key) as agent:
            n = agent.store.delete_items(parse_ids(text))
            gr.Info(f"deleted {n} item(s)")
            return facts(agent), history_frame(agent), ""

    @readable
    def import_file(key: str, path: str | None):
        if not path:
            raise gr.Error("choose a JSONL file to import")
        items = read_items(path)
        with devices.lock(key), devices.agent(key) as agent:
            agent.store.add_items(items)
            gr.Info(f"imported {len(items)} item(s)")
            return facts(agent), history_frame(agent), None

    @readable
    def train_device(
        key: str,
        n: float,
        usage: float,
        tap_encoding: str = DEFAULT_TAP_ENCODING,
        progress=gr.Progress(),
    ) -> Iterator:
        events: queue.Queue[Progress | BaseException | None] = queue.Queue()
        cfg = devices.config.train_config(
            epochs=int(n), target_usage=float(usage), tap_encoding=tap_encoding
        )

        def work() -> None:
            try:
                with devices.lock(key), devices.agent(key) as agent:
                    agent.train(cfg, on_progress=events.put)
                events.put(None)
            except BaseException as exc:  # shown by the handler below
                events.put(exc)

        threading.Thread(target=work, daemon=True, name=f"train-{key}").start()
        epochs_seen: list[dict] = []
        progress(0, desc="starting")
        while (event := events.get()) is not None:
            if isinstance(event, BaseException):
                raise event
            if event.stage == "epoch":
                epochs_seen.append(event.info)
            fraction = event.done / max(event.total, 1)
            progress(fraction, desc=f"{event.stage} {event.done}/{event.total}")
            yield gr.skip(), loss_frame(epochs_seen)
        with devices.lock(key), devices.agent(key) as agent:
            gr.Info("trained: the Generate tab now uses the new checkpoint")
            yield facts(agent), loss_frame(epochs_seen)

    page.load(show, user, [info, history])
    user.change(show, user, [info, history])
    add.click(add_item, [user, prompt, response], [info, history, prompt, response])
    delete.click(delete_items, [user, ids], [info, history, ids])
    upload.upload(import_file, [user, upload], [info, history, upload])
    train.click(train_device, [user, epochs, budget, encoding], [info, curve], api_name="train")
