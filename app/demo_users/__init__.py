"""The product's demo users: short, distinctive, perfectly consistent histories written for the
demo (no dataset text), so a side network trained on 40 replies visibly changes what the
backbone writes. Each file holds `{"prompt", "response"}` lines."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from device_agent.history import read_items

HERE = Path(__file__).parent


@dataclass(frozen=True)
class DemoUser:
    key: str  # the device directory's name and the federated user id
    name: str
    style: str  # what their history teaches, in a few words
    prompts: tuple[str, str, str]  # example prompts that show it (none is in the history)

    @property
    def file(self) -> Path:
        return HERE / f"{self.key}.jsonl"

    def items(self) -> list[dict]:
        return read_items(self.file)


DEMO_USERS: tuple[DemoUser, ...] = (
    DemoUser(
        "pirate",
        "Captain Ada",
        "a pirate: 'Arr, matey! … Yo-ho-ho!'",
        (
            "What should I pack for a weekend at the beach?",
            "How can I sleep better?",
            "Can you recommend a book?",
        ),
    ),
    DemoUser(
        "chef",
        "Chef Marco",
        "an Italian cook: every answer a dish, 'Buon appetito!'",
        (
            "What should I cook tonight?",
            "What should I do this weekend?",
            "How can I sleep better?",
        ),
    ),
    DemoUser(
        "haiku",
        "Poet Kenji",
        "answers in lowercase haiku, '~ kenji'",
        ("How do I learn to code?", "Any tips for a rainy Sunday?", "How can I sleep better?"),
    ),
)


def demo_user(key: str) -> DemoUser:
    for user in DEMO_USERS:
        if user.key == key:
            return user
    raise KeyError(f"no demo user {key!r}: {', '.join(u.key for u in DEMO_USERS)}")


def write_users_file(path: Path) -> Path:
    """Every demo user as one `{"user_id", "items"}` line (what a federated run reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"user_id": u.key, "items": [json.loads(line) for line in u.file.read_text().splitlines()]}
        for u in DEMO_USERS
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
