"""The Recommend tab: a purchase history in — a held-out Beauty user's, or typed — and the cloud's
top-K catalogue items out, by beam search and by strict speculative search side by side, with
each one's wall time on the cloud, the speed-up and the draft's acceptance.

Both searches run on the cloud (`POST /v1/recommendations`) for the visitor's own device; the
cloud ranks with its recommendation target (`spa cloud --recommend-target`).
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from app.devices import MY_DEVICE, Devices
from app.ui.common import readable
from personalization.atspeed.target import TargetConfig
from personalization.training.data import read_jsonl
from protocol.messages import RecommendIn, RecommendOut

SHARED_BEAUTY = Path("../shared/data/beauty.jsonl")
TYPED = "(type a history below)"
USERS_SHOWN = 50


def beauty_users(path: Path = SHARED_BEAUTY) -> dict[str, tuple[list[str], str]]:
    """The first held-out test users of the trained target's split: history → next purchase."""
    if not path.is_file():
        return {}
    import random

    cfg = TargetConfig()
    rows = list(read_jsonl(path))
    random.Random(cfg.seed).shuffle(rows)  # as the target's split (training.data.load_splits)
    return {
        r["user_id"]: (r["history"] + r["valid"], r["test"][0])
        for r in rows[: cfg.test_users][:USERS_SHOWN]
    }


def ranked(out: RecommendOut, truth: str | None) -> pd.DataFrame:
    return pd.DataFrame(
        [[rank, ("✓ " if item.title == truth else "") + item.title, round(item.score, 3)]
         for rank, item in enumerate(out.items, 1)],
        columns=["#", "item", "log-prob"],
    )  # fmt: skip


def build(devices: Devices) -> None:
    users = beauty_users()
    with gr.Row():
        user = gr.Dropdown([TYPED, *users], value=next(iter(users), TYPED), label="Beauty user "
                           "(held out from the target's training)")  # fmt: skip
        k = gr.Slider(1, 20, 10, step=1, label="K (items = beams)")
        gamma = gr.Slider(1, 8, 5, step=1, label="γ (steps drafted per verification)")
        go = gr.Button("Recommend", variant="primary", elem_id="recommend")
    history = gr.Textbox(lines=6, label="purchase history, oldest first (one title per line)",
                         elem_id="rec-history")  # fmt: skip
    status = gr.Markdown(elem_id="rec-status")
    with gr.Row():
        beam = gr.Dataframe(label="beam search", wrap=True, elem_id="rec-beam")
        spec = gr.Dataframe(label="speculative search (strict)", wrap=True, elem_id="rec-spec")

    def pick(key: str) -> str:
        return "\n".join(users[key][0]) if key in users else ""

    @readable
    def run(key: str, text: str, k_: float, gamma_: float) -> tuple:
        titles = [t.strip() for t in text.splitlines() if t.strip()]
        if not titles:
            raise gr.Error("give a purchase history: pick a Beauty user or type titles")
        truth = users[key][1] if key in users and titles == users[key][0] else None
        with devices.agent(MY_DEVICE) as agent:
            out = {
                s: agent.client.recommend(
                    RecommendIn(history=titles, k=int(k_), strategy=s, gamma=int(gamma_))
                )  # fmt: skip
                for s in ("beam", "speculative-strict")
            }
        b, s = out["beam"], out["speculative-strict"]
        same = [i.title for i in b.items] == [i.title for i in s.items]
        found = "" if truth is None else (
            f" · next purchase: **{truth}** — " + ("✓ recommended" if any(
                i.title == truth for i in b.items) else "not in the top K")
        )  # fmt: skip
        line = (
            f"target: `{b.target}` · beam {b.seconds:.2f} s ({b.target_passes} passes) · "
            f"speculative {s.seconds:.2f} s ({s.target_passes} passes, "
            f"{(s.acceptance or 0):.0%} of drafted steps accepted) · **speed-up "
            f"{b.seconds / s.seconds:.2f}×** · same items: {'yes' if same else 'no'}{found}"
        )
        return line, ranked(b, truth), ranked(s, truth)

    user.change(pick, user, history)
    go.click(run, [user, history, k, gamma], [status, beam, spec], api_name="recommend")
    if users:
        history.value = pick(next(iter(users)))
