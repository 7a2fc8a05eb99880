"""The Recommend tab: a purchase history in — a shopper's from the shop's histories, or typed —
and the cloud's top-K catalogue items out, each with its item code, by beam search and by strict
speculative search side by side, with each one's wall time on the cloud, the speed-up and the
draft's acceptance.

Both searches run on the cloud (`POST /v1/recommendations`) for the visitor's own device; the
cloud ranks with its code target. The demo serves its own little shop (`app.demo_catalogue`)
and trains its target beside the page; until it is trained the page says so.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from app.devices import MY_DEVICE, Devices
from app.ui.common import readable
from device_agent.errors import DeviceError
from personalization.atspeed.split import load_users, test_cases
from personalization.training.data import DataError
from protocol.messages import RecommendIn, RecommendOut

TYPED = "(type a history below)"
USERS_SHOWN = 50


def shoppers(path: Path | None) -> dict[str, tuple[list[str], frozenset[str]]]:
    """The first users with a test item: their last purchases → every later purchase."""
    if path is None or not path.is_file():
        return {}
    try:
        cases = test_cases(load_users(path))[:USERS_SHOWN]
    except DataError:
        return {}
    return {c.user: (list(c.items), c.truth) for c in cases}


def ranked(out: RecommendOut, truth: frozenset[str]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            [
                rank,
                ("✓ " if item.title in truth else "") + item.title,
                item.code,
                round(item.score, 3),
            ]
            for rank, item in enumerate(out.items, 1)
        ],
        columns=["#", "item", "code", "log-prob"],
    )


def build(devices: Devices, histories: Path | None) -> None:
    users = shoppers(histories)
    with gr.Row():
        user = gr.Dropdown(
            [TYPED, *users],
            value=next(iter(users), TYPED),
            label="shopper (their later purchases are marked ✓ when recommended)",
        )
        k = gr.Slider(1, 20, 10, step=1, label="K (items = beams)")
        gamma = gr.Slider(1, 4, 3, step=1, label="γ (code steps drafted per verification)")
        go = gr.Button("Recommend", variant="primary", elem_id="recommend")
    history = gr.Textbox(
        lines=6,
        label="purchase history, oldest first (one catalogue title per line)",
        elem_id="rec-history",
    )
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
            raise gr.Error("give a purchase history: pick a shopper or type catalogue titles")
        truth = users[key][1] if key in users and titles == users[key][0] else frozenset()
        try:
            with devices.agent(MY_DEVICE) as agent:
                out = {
                    s: agent.client.recommend(
                        RecommendIn(history=titles, k=int(k_), strategy=s, gamma=int(gamma_))
                    )
                    for s in ("beam", "speculative-strict")
                }
        except DeviceError as exc:  # no catalogue, target still training, unknown item: say so
            return f"**The cloud cannot recommend:** {exc}", None, None
        b, s = out["beam"], out["speculative-strict"]
        same = [i.title for i in b.items] == [i.title for i in s.items]
        hits = sum(i.title in truth for i in b.items)
        found = f" · later purchases recommended: **{hits} of {len(truth)}**" if truth else ""
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
