"""The Federated tab: a small Flower simulation (the same `spa federate` the CLI runs, against
the demo's cloud) whose per-round table and plot fill in as the ServerApp records each round."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import gradio as gr
import pandas as pd

from app.demo_users import write_users_file
from app.devices import Devices
from app.federation.launch import federate
from app.federation.records import COLUMNS, Records
from app.ui.common import readable
from personalization.config import FEDERATED_STRATEGIES
from personalization.training.data import read_jsonl

DEMO_USERS = "the demo users"
SHARED_PERSONACHAT = Path("../shared/data/personachat.jsonl")


def sources(root: Path) -> dict[str, Path]:
    """Where a simulation's users come from: the demo users, and PersonaChat if it is here."""
    found = {DEMO_USERS: write_users_file(root / "demo-users.jsonl")}
    if SHARED_PERSONACHAT.is_file():
        found[f"PersonaChat ({SHARED_PERSONACHAT})"] = SHARED_PERSONACHAT.resolve()
    return found


SERIES = {"rouge-l": "personalised", "rouge-l-base": "base"}


def rouge_frame(rows: dict[int, dict]) -> pd.DataFrame:
    """Rouge-L per round of both series (each in every frame: a streamed plot fixes its series
    from the first)."""
    points = [
        {"round": r, "model": name, "Rouge-L": v.get(key)}
        for r, v in sorted(rows.items())
        for key, name in SERIES.items()
    ]
    return pd.DataFrame(
        points or [{"round": 0, "model": n, "Rouge-L": None} for n in SERIES.values()]
    )


def rounds_frame(records: Records, run: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The aggregated metrics per round (a table) and Rouge-L per round (a plot's rows)."""
    rows: dict[int, dict] = {}
    for m in records.metrics(run):
        rows.setdefault(m.round, {}).update(m.metrics)
    failed: dict[int, int] = {}
    for f in records.failures(run):
        failed[f.round] = failed.get(f.round, 0) + 1
    table = pd.DataFrame(
        [
            [r, *(_round(v.get(c)) for c in COLUMNS), failed.get(r, 0)]
            for r, v in sorted(rows.items())
        ],
        columns=["round", *COLUMNS, "failed replies"],
    )
    return table, rouge_frame(rows)


def _round(v):
    return None if v is None else round(float(v), 3)


def build(devices: Devices, root: Path) -> None:
    found = sources(root)
    with gr.Row():
        source = gr.Dropdown(list(found), value=DEMO_USERS, label="users")
        users = gr.Slider(2, 8, 3, step=1, label="devices")
        rounds = gr.Slider(1, 5, 2, step=1, label="rounds")
        strategy = gr.Radio(list(FEDERATED_STRATEGIES), value="fedper", label="strategy")
        epochs = gr.Slider(1, 10, 2, step=1, label="local epochs per round")
        start = gr.Button("Start simulation", variant="primary")
    status = gr.Markdown()
    table = gr.Dataframe(label="per round (aggregated over devices)")
    plot = gr.LinePlot(
        rouge_frame({}), x="round", y="Rouge-L", color="model", title="held-out Rouge-L", height=300
    )

    @readable
    def simulate(source: str, n: float, r: float, strat: str, e: float) -> Iterator[tuple]:
        data = found[source]
        available = sum(1 for _ in read_jsonl(data))
        if n > available:
            raise gr.Error(f"{source} has {available} users: choose at most {available} devices")
        run = f"{strat}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
        work = root / "federated" / run
        outcome: dict = {}

        def work_() -> None:
            try:
                outcome["code"] = federate(
                    strategy=strat,
                    nodes=int(n),
                    rounds=int(r),
                    data=data,
                    work=work,
                    backbone=devices.backbone,
                    cloud_url=devices.cloud_url,
                    extra={"local-epochs": int(e), "run-name": run},
                )
            except Exception as exc:  # shown below
                outcome["error"] = exc

        thread = threading.Thread(target=work_, daemon=True, name=f"federate-{run}")
        thread.start()
        started = time.monotonic()
        records = None
        while thread.is_alive():
            time.sleep(2)
            if records is None and (work / "federated.db").is_file():
                records = Records(f"sqlite:///{work / 'federated.db'}")
            frames = rounds_frame(records, run) if records else (gr.skip(), gr.skip())
            yield f"running **{run}** … {time.monotonic() - started:.0f} s", *frames
        if "error" in outcome:
            raise gr.Error(f"the simulation could not run: {outcome['error']}")
        records = Records(f"sqlite:///{work / 'federated.db'}")
        failures = records.failures(run)
        note = f"; {len(failures)} failed replies recorded" if failures else ""
        code = outcome.get("code")
        state = "finished" if code == 0 else f"ended with exit status {code} (see the terminal)"
        yield (
            f"**{run}** {state} in {time.monotonic() - started:.0f} s{note} · records: "
            f"`{work / 'federated.db'}`",
            *rounds_frame(records, run),
        )

    start.click(
        simulate,
        [source, users, rounds, strategy, epochs],
        [status, table, plot],
        api_name="federate",
    )
