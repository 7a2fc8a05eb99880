"""AtSpeed's split of a Beauty-format file: by global time, every user kept.

Each row of `beauty.jsonl` holds one user's purchases before the validation period (`history`),
in it (`valid`) and in the test period (`test`). Nothing is held out by user:

- **training**: every user's `history`, each purchase predicted from the ones before it;
- **validation** (model selection only): input the last ≤ 20 of `history`, truth every `valid`
  item (users with none are skipped);
- **test**: input the last ≤ 20 of `history + valid`, truth **all** of the user's `test` items.

A file a model was not trained on (`--eval-data`) is scored the same way: its users' histories
are only read, never trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from personalization.training.data import DataError, read_jsonl

MAX_ITEMS = 20  # AtSpeed: the prompt holds a user's last 20 items


@dataclass(frozen=True)
class User:
    user: str
    history: tuple[str, ...]
    valid: tuple[str, ...]
    test: tuple[str, ...]


@dataclass(frozen=True)
class Case:
    """One ranking to score: the input purchases (oldest first) and every true next item."""

    user: str
    items: tuple[str, ...]
    truth: frozenset[str]


def load_users(path: str | Path) -> list[User]:
    users = []
    for row in read_jsonl(path):
        try:
            users.append(
                User(
                    str(row["user_id"]),
                    tuple(row["history"]),
                    tuple(row.get("valid", ())),
                    tuple(row.get("test", ())),
                )
            )
        except (KeyError, TypeError):
            raise DataError(f"{path}: every row needs user_id and a history list") from None
    if not users:
        raise DataError(f"{path}: no users")
    return users


def training_sequences(users: Sequence[User]) -> list[tuple[str, ...]]:
    """What trains: every user's purchases before the validation period."""
    return [u.history for u in users if u.history]


def valid_cases(users: Sequence[User], max_items: int = MAX_ITEMS) -> list[Case]:
    return [
        Case(u.user, u.history[-max_items:], frozenset(u.valid))
        for u in users
        if u.valid and u.history
    ]


def test_cases(users: Sequence[User], max_items: int = MAX_ITEMS) -> list[Case]:
    return [
        Case(u.user, (u.history + u.valid)[-max_items:], frozenset(u.test))
        for u in users
        if u.test and (u.history or u.valid)
    ]


def validation_period(users: Sequence[User]) -> list[str]:
    """Every purchase of the validation period (before any test item): 'recent popular'."""
    return [item for u in users for item in u.valid]
