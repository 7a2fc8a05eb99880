"""The device's private store (a real SQLite file) and its history importers (synthetic rows and
the shared PersonaChat / Beauty files)."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from device_agent.errors import DeviceError, StoreError
from device_agent.history import (
    PURCHASE,
    TEXT_INSTRUCTION,
    pair_item,
    read_items,
    text_item,
    user_items,
)
from device_agent.store import SCHEMA_VERSION, Store
from personalization.training.data import PERSONACHAT_INSTRUCTION

SHARED = Path(os.environ.get("SPA_DATA_DIR", Path(__file__).parents[2] / "shared" / "data"))
META = {"device_id": "dev-1", "token": "secret-token", "name": "phone", "cloud_url": "http://x"}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def store(tmp_path):
    s = Store.create(tmp_path / "dev", META)
    yield s
    s.close()


def _history_rows(root: Path) -> list[tuple]:
    """The history table as SQLite itself sees it (not through the store)."""
    with sqlite3.connect(root / "device.db") as conn:
        return conn.execute("SELECT id, kind, output FROM history ORDER BY id").fetchall()


# ---- creating and opening ----------------------------------------------------------------------
def test_create_makes_a_private_directory_and_database(tmp_path):
    root = tmp_path / "nested" / "dev"
    s = Store.create(root, META)
    try:
        assert _mode(root) == 0o700
        for sub in ("checkpoints", "features", "head"):
            assert (root / sub).is_dir() and _mode(root / sub) == 0o700
        assert (root / "device.db").is_file()
        assert _mode(root / "device.db") == 0o600
        assert s.get("token") == "secret-token"
        assert s.get("device_id") == "dev-1"
        assert s.get("schema_version") == str(SCHEMA_VERSION)
        s.set(name="tablet")  # a write: the WAL / shared-memory files appear next to the db
        assert s.get("name") == "tablet"
        for sidecar in root.glob("device.db*"):  # the WAL holds the token too
            assert _mode(sidecar) == 0o600, sidecar.name
    finally:
        s.close()


def test_create_refuses_a_directory_that_already_holds_a_device(tmp_path):
    root = tmp_path / "dev"
    Store.create(root, META).close()
    with pytest.raises(StoreError, match="already holds a device"):
        Store.create(root, {**META, "token": "other"})
    s = Store(root)  # the first device is untouched
    try:
        assert s.get("token") == "secret-token"
    finally:
        s.close()


def test_opening_a_directory_that_is_not_a_device(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError) as caught:
        Store(tmp_path / "plain")
    message = str(caught.value)
    assert str(tmp_path / "plain") in message
    assert "not a device directory" in message and "spa device init" in message


def test_opening_a_missing_directory(tmp_path):
    with pytest.raises(StoreError, match="not a device directory"):
        Store(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_a_device_directory_without_its_database_is_refused(tmp_path):
    (tmp_path / "dev" / "checkpoints").mkdir(parents=True)
    with pytest.raises(StoreError, match="unreadable device database"):
        Store(tmp_path / "dev")


def test_another_schema_version_is_refused_naming_both(tmp_path):
    root = tmp_path / "dev"
    Store.create(root, META).close()
    with sqlite3.connect(root / "device.db") as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError) as caught:
        Store(root)
    message = str(caught.value)
    assert "version 99" in message
    assert f"version {SCHEMA_VERSION}" in message
    assert str(root) in message


# ---- history rows --------------------------------------------------------------------------
def test_add_and_list_items(store):
    ids = store.add_items([text_item("a note"), pair_item("q?", "an answer", "ctx", "src")])
    assert ids == [1, 2]
    rows = store.items()
    assert [(r.id, r.kind, r.instruction, r.input, r.output, r.source) for r in rows] == [
        (1, "text", TEXT_INSTRUCTION, "", "a note", ""),
        (2, "pair", "q?", "ctx", "an answer", "src"),
    ]


def test_add_items_is_all_or_nothing(store):
    store.add_items([text_item("kept")])
    before = _history_rows(store.root)
    bad = {"kind": "text", "instruction": TEXT_INSTRUCTION, "source": "x"}  # no output: NOT NULL
    with pytest.raises((IntegrityError, StoreError)):
        store.add_items([text_item("first of the batch"), text_item("second"), bad])
    assert _history_rows(store.root) == before == [(1, "text", "kept")]
    assert [r.output for r in store.items()] == ["kept"]
    # the store is still usable afterwards, and the rolled-back rows left no trace
    (new_id,) = store.add_items([text_item("after")])
    assert [r.output for r in store.items()] == ["kept", "after"]
    assert new_id > 1


def test_delete_items(store):
    ids = store.add_items([text_item(f"note {i}") for i in range(3)])
    assert store.delete_items([ids[0], ids[2]]) == 2
    assert [r.output for r in store.items()] == ["note 1"]


def test_delete_of_a_missing_id_deletes_nothing(store):
    ids = store.add_items([text_item("one"), text_item("two")])
    with pytest.raises(StoreError, match="no history item 999"):
        store.delete_items([ids[0], 999])
    assert [r.output for r in store.items()] == ["one", "two"]
    assert _history_rows(store.root) == [(1, "text", "one"), (2, "text", "two")]


def test_delete_counts_a_repeated_id_once(store):
    (item_id,) = store.add_items([text_item("only")])
    assert store.delete_items([item_id, item_id]) == 1
    assert store.items() == []


# ---- items -----------------------------------------------------------------------------------
def test_text_item_and_pair_item_refuse_empty_text():
    assert text_item("  hi  ")["output"] == "hi"
    for empty in ("", "   ", "\n\t"):
        with pytest.raises(DeviceError, match="needs some text"):
            text_item(empty)
        with pytest.raises(DeviceError, match="both a prompt and a response"):
            pair_item(empty, "response")
        with pytest.raises(DeviceError, match="both a prompt and a response"):
            pair_item("prompt", empty)


# ---- JSONL import ------------------------------------------------------------------------
def test_read_items_accepts_the_three_line_formats(tmp_path):
    path = _write(
        tmp_path / "items.jsonl",
        [
            json.dumps({"text": "I walk my two dogs every morning."}),
            json.dumps({"prompt": "Favourite food?", "response": "Pho."}),
            json.dumps({"instruction": "Summarise", "input": "long text", "output": "short"}),
            json.dumps({"instruction": "Greet", "output": "hello"}),  # input optional
        ],
    )
    items = read_items(path)
    assert items == [
        {
            "kind": "text",
            "instruction": TEXT_INSTRUCTION,
            "output": "I walk my two dogs every morning.",
            "source": f"{path}:1",
        },
        {
            "kind": "pair",
            "instruction": "Favourite food?",
            "input": "",
            "output": "Pho.",
            "source": f"{path}:2",
        },
        {
            "kind": "pair",
            "instruction": "Summarise",
            "input": "long text",
            "output": "short",
            "source": f"{path}:3",
        },
        {
            "kind": "pair",
            "instruction": "Greet",
            "input": "",
            "output": "hello",
            "source": f"{path}:4",
        },
    ]


def test_imported_items_go_into_the_store(tmp_path, store):
    path = _write(
        tmp_path / "items.jsonl",
        [json.dumps({"text": "t"}), json.dumps({"instruction": "i", "input": None, "output": "o"})],
    )
    ids = store.add_items(read_items(path))  # a null input is an empty input
    assert len(ids) == 2
    assert [(r.kind, r.input, r.output) for r in store.items()] == [
        ("text", "", "t"),
        ("pair", "", "o"),
    ]


@pytest.mark.parametrize(
    "bad",
    [
        "not json",
        json.dumps({"foo": 1}),
        "42",
        "null",
        json.dumps({"text": "   "}),
        json.dumps({"text": None}),
        json.dumps({"prompt": "", "response": "r"}),
        json.dumps({"instruction": ["a", "list"], "output": "b"}),
    ],
)
def test_a_bad_line_is_a_device_error_naming_file_and_line(tmp_path, bad):
    path = _write(tmp_path / "items.jsonl", [json.dumps({"text": "fine"}), bad])
    with pytest.raises(DeviceError) as caught:
        read_items(path)
    assert f"{path}:2" in str(caught.value)


def test_the_line_number_counts_blank_lines(tmp_path):
    path = _write(tmp_path / "items.jsonl", [json.dumps({"text": "fine"}), "", '{"foo": 1}'])
    with pytest.raises(DeviceError) as caught:
        read_items(path)
    assert f"{path}:3:" in str(caught.value)


def test_an_empty_file_is_a_clear_error(tmp_path):
    for name, content in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n")):
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(DeviceError, match="holds no history items") as caught:
            read_items(path)
        assert str(path) in str(caught.value)


def test_a_missing_file_is_a_device_error(tmp_path):
    with pytest.raises(DeviceError, match="no such data file"):
        read_items(tmp_path / "absent.jsonl")


# ---- one user of PersonaChat / Beauty ----------------------------------------------------------
def _personachat_rows() -> list[dict]:
    return [
        {
            "user_id": f"u{u}",
            "persona": [f"i am user {u}.", "i like tea."],
            "turns": [{"partner": f"partner {u}-{t}", "reply": f"reply {u}-{t}"} for t in range(4)],
        }
        for u in range(3)
    ]


def test_user_items_from_personachat(tmp_path):
    path = _write(tmp_path / "personachat.jsonl", [json.dumps(r) for r in _personachat_rows()])
    persona, items = user_items(path, "u1")[:2], user_items(path, "u1")[2:]
    # the persona's sentences first, as free text; then every reply with its context
    assert [(i["kind"], i["output"]) for i in persona] == [
        ("text", "i am user 1."),
        ("text", "i like tea."),
    ]
    assert {i["source"] for i in persona} == {"personachat.jsonl:u1:persona"}
    assert len(items) == 4
    assert [i["output"] for i in items] == [f"reply 1-{t}" for t in range(4)]
    assert {i["kind"] for i in items} == {"pair"}
    assert {i["instruction"] for i in items} == {PERSONACHAT_INSTRUCTION}
    assert {i["source"] for i in items} == {"personachat.jsonl:u1"}
    assert items[0]["input"] == "Them: partner 1-0"
    # the context holds the earlier exchanges, never the reply being predicted
    assert "You: reply 1-1" in items[2]["input"] and "reply 1-2" not in items[2]["input"]
    assert "Them: partner 1-2" in items[2]["input"]
    assert all("partner 0-" not in i["input"] and "reply 2-" not in i["input"] for i in items)


def test_user_items_from_beauty_leave_the_test_item_out(tmp_path):
    rows = [
        {
            "user_id": "b1",
            "history": [f"product {k}" for k in range(5)],
            "valid": ["product valid"],
            "test": ["product test"],
        },
        {"user_id": "b2", "history": ["x 0", "x 1", "x 2"], "valid": [], "test": ["x test"]},
    ]
    path = _write(tmp_path / "beauty.jsonl", [json.dumps(r) for r in rows])
    items = user_items(path, "b1")
    # purchases, oldest first: 5 history + 1 valid (they train on the cloud's item codes)
    assert [i["output"] for i in items] == [f"product {k}" for k in range(5)] + ["product valid"]
    assert {i["kind"] for i in items} == {PURCHASE}
    assert all("product test" not in i["output"] for i in items)
    assert [i["output"] for i in user_items(path, "b2")] == ["x 0", "x 1", "x 2"]


def test_user_items_errors(tmp_path):
    path = _write(tmp_path / "personachat.jsonl", [json.dumps(r) for r in _personachat_rows()])
    with pytest.raises(DeviceError, match="no user 'nobody'"):
        user_items(path, "nobody")
    odd = _write(tmp_path / "odd.jsonl", [json.dumps({"user_id": "z", "stuff": []})])
    with pytest.raises(DeviceError, match="`turns`"):
        user_items(odd, "z")
    with pytest.raises(DeviceError, match="no such data file"):
        user_items(tmp_path / "absent.jsonl", "u1")


# ---- the shared real files ---------------------------------------------------------------------
def _first_row(name: str, where=lambda r: True) -> tuple[Path, dict]:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if where(row):
                return path, row
    pytest.skip(f"{path}: no matching row")


def test_user_items_on_real_personachat():
    path, row = _first_row("personachat.jsonl")
    items = user_items(path, row["user_id"])
    persona, replies = items[: len(row["persona"])], items[len(row["persona"]) :]
    assert [i["output"] for i in persona] == [s.strip() for s in row["persona"]]
    assert len(replies) == len(row["turns"]) > 0
    assert [i["output"] for i in replies] == [t["reply"].strip() for t in row["turns"]]
    assert {i["source"] for i in replies} == {f"personachat.jsonl:{row['user_id']}"}


@pytest.mark.parametrize("with_valid", [False, True])
def test_user_items_on_real_beauty(with_valid):
    path, row = _first_row("beauty.jsonl", lambda r: bool(r["valid"]) == with_valid)
    purchases = row["history"] + row["valid"]
    items = user_items(path, row["user_id"])
    assert [i["output"] for i in items] == purchases and {i["kind"] for i in items} == {PURCHASE}
    unseen = [t for t in row["test"] if t not in purchases]  # a repeat purchase may reappear
    assert all(i["output"] != t.strip() for t in unseen for i in items)
