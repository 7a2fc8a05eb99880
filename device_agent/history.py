"""The user's local history: what it may hold, how it is imported, and how it becomes training
records (`personalization.training.data.Record`: instruction, input, output).

Items are prompt/response pairs (a reply the user wrote to a message), free text (a note the user
wrote), which trains under a standing instruction, or purchases (a product's title), which train
a recommender as the cloud's item codes (`purchases`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from device_agent.errors import DeviceError
from personalization.training.data import DataError, Record, personachat_records, read_jsonl

TEXT_INSTRUCTION = "Write a short note in your own words."
PURCHASE = "purchase"  # the kind of a purchase item: its `output` is the product's title


def purchase_item(title: str, source: str = "") -> dict[str, Any]:
    if not title.strip():
        raise DeviceError("a purchase needs the product's title")
    return {"kind": PURCHASE, "instruction": "", "output": title, "source": source}


def text_item(text: str, source: str = "") -> dict[str, Any]:
    text = text.strip()
    if not text:
        raise DeviceError("a history item needs some text")
    return {"kind": "text", "instruction": TEXT_INSTRUCTION, "output": text, "source": source}


def pair_item(prompt: str, response: str, input: str = "", source: str = "") -> dict[str, Any]:
    if not prompt.strip() or not response.strip():
        raise DeviceError("a prompt/response item needs both a prompt and a response")
    return {
        "kind": "pair",
        "instruction": prompt.strip(),
        "input": input,
        "output": response.strip(),
        "source": source,
    }


def read_items(path: str | Path) -> list[dict[str, Any]]:
    """A JSONL file of items: {"text"}, {"purchase"} (a product's title, oldest first),
    {"prompt", "response"} or the paper's {"instruction", "input", "output"} per line. Errors
    name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DeviceError(f"{path}: no such data file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DeviceError(f"{path}: cannot read ({exc})") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            items.append(_item(json.loads(line), where))
        except json.JSONDecodeError as exc:
            raise DeviceError(f"{where}: not a JSON line ({exc.msg})") from None
        except DeviceError as exc:
            raise DeviceError(f"{where}: {exc}") from None
    if not items:
        raise DeviceError(f"{path} holds no history items")
    return items


def _item(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DeviceError(f"expected a JSON object, found {type(row).__name__}")
    if row.get("input") is None:  # the paper's files write an empty input as null
        row = {k: v for k, v in row.items() if k != "input"}
    for key in ("text", "prompt", "response", "instruction", "input", "output", "purchase"):
        if key in row and not isinstance(row[key], str):
            raise DeviceError(f"{key!r} must be a string, found {type(row[key]).__name__}")
    if "text" in row:
        return text_item(row["text"], where)
    if "purchase" in row:
        return purchase_item(row["purchase"], where)
    if "prompt" in row and "response" in row:
        return pair_item(row["prompt"], row["response"], source=where)
    if "instruction" in row and "output" in row:
        return pair_item(row["instruction"], row["output"], row.get("input", ""), where)
    raise DeviceError(
        f"expected text, purchase, prompt + response, or instruction + output; found {sorted(row)}"
    )


def user_items(path: str | Path, user_id: str) -> list[dict[str, Any]]:
    """One user's history from `personachat.jsonl` (the persona's sentences as free text, then
    every reply with its context),
    `beauty.jsonl` (each purchase, oldest first, as a purchase item; the user's held-out `test`
    items stay out), or a file of `{"user_id", "items": [item, ...]}` rows
    (items as `read_items` takes them: the demo users)."""
    try:
        row = _row(path, user_id)
    except (DataError, OSError) as exc:
        raise DeviceError(str(exc)) from None
    if row is None:
        raise DeviceError(f"{path}: no user {user_id!r}")
    source = f"{Path(path).name}:{user_id}"
    try:
        return _user_items(row, user_id, source)
    except DeviceError as exc:
        raise DeviceError(f"{path}: {exc}") from None
    except (KeyError, TypeError, AttributeError, ValueError) as exc:  # a row of another shape
        raise DeviceError(f"{path}: user {user_id!r} is not a history row ({exc!r})") from None


def _user_items(row: dict, user_id: str, source: str) -> list[dict[str, Any]]:
    if "items" in row:
        return [_item(dict(item), f"{source}:{n}") for n, item in enumerate(row["items"], 1)]
    if "turns" in row:
        persona = [text_item(s, f"{source}:persona") for s in row.get("persona", []) if s.strip()]
        replies = personachat_records(row)
        return persona + [pair_item(r.instruction, r.output, r.input, source) for r in replies]
    if "history" in row:
        return [purchase_item(t, f"{source}:{n}") for n, t in enumerate(_purchases(row), 1)]
    raise DeviceError("user rows need `turns` (PersonaChat), `history` (Beauty) or `items`")


def purchases_of(path: str | Path, user_id: str) -> list[str] | None:
    """A Beauty user's purchases, or None where the file is not a purchase file."""
    row = _row(path, user_id)
    return _purchases(row) if row is not None and "history" in row else None


def _row(path: str | Path, user_id: str) -> dict | None:
    return next((r for r in read_jsonl(path) if str(r.get("user_id")) == user_id), None)


def _purchases(row: dict) -> list[str]:
    """History, then validation items; the held-out test item stays out."""
    return list(row["history"]) + list(row.get("valid", []))


def to_record(item: Any) -> Record:
    """A stored item (row or dict) as a training record."""
    get = item.get if isinstance(item, dict) else lambda k, d="": getattr(item, k, d)
    return Record(get("instruction"), get("input", "") or "", get("output"))
