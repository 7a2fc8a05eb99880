"""What the demo users' side networks do to the backbone's answers, through a running demo's API.

    spa demo &                # or make demo; then, once the page answers:
    python benchmarks/demo_users.py [--url http://127.0.0.1:7860/] [--tokens 40]

For each demo user, its example prompt and a few prompts outside every history, greedy `spa`
over the `datacenter` profile at the calibrated threshold: how many tokens the device shaped, and
the answer. The same prompts under `base` come first, for comparison. Shows where 40 replies
personalise a 135M backbone and where they break down (repetition, truncated answers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gradio_client import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _hardware import hardware  # noqa: E402

from app.demo_users import DEMO_USERS  # noqa: E402

OTHER_PROMPTS = ["Can you recommend a book?", "What should I do this weekend?"]


def answer(client: Client, user: str, prompt: str, setting: str, tokens: int):
    """(device tokens, tokens, text) of one greedy answer."""
    out = client.predict(
        user, prompt, setting, "greedy", "datacenter", True, 0.5, tokens, 0, 4, api_name="/generate"
    )
    pieces = out[0]["value"] if isinstance(out[0], dict) else out[0]
    branches = [p["class_or_confidence"] for p in pieces]
    return branches.count("device"), len(branches), "".join(p["token"] for p in pieces)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860/")
    parser.add_argument("--tokens", type=int, default=40)
    args = parser.parse_args()
    client = Client(args.url, verbose=False)
    print("| user | prompt | device tokens | answer |\n|---|---|---|---|")
    prompts = [(u.key, p) for u in DEMO_USERS for p in (u.prompt, *OTHER_PROMPTS)]
    for prompt in dict.fromkeys(p for _, p in prompts):  # base ignores the user's device
        _, n, text = answer(client, DEMO_USERS[0].key, prompt, "base", args.tokens)
        print(f"| base | {prompt} | 0 / {n} | {text!r} |")
    for key, prompt in prompts:
        device, n, text = answer(client, key, prompt, "spa", args.tokens)
        print(f"| {key} | {prompt} | {device} / {n} | {text!r} |")
    print(f"\nhardware: {hardware()}")


if __name__ == "__main__":
    main()
