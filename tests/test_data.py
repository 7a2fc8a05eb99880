"""Records, loaders and splits: the paper's JSONL format, every shared dataset, per-user splits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from personalization.training.data import (
    DATASETS,
    DataError,
    Record,
    load_splits,
    read_jsonl,
    to_example,
)

SHARED = Path(os.environ.get("SPA_DATA_DIR", Path(__file__).parents[2] / "shared" / "data"))


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _personachat(tmp_path: Path, users: int = 30) -> Path:
    rows = [
        {
            "user_id": f"u{u}",
            "persona": [f"i am user {u}."],
            "turns": [{"partner": f"p{u}-{t}", "reply": f"r{u}-{t}"} for t in range(4)],
        }
        for u in range(users)
    ]
    return _write(tmp_path / "personachat.jsonl", rows)


def test_records_round_trip_in_the_papers_format(tmp_path):
    records = [Record("Summarize.", "a text", "a summary"), Record("Reply.", "hi", "yo", user="u1")]
    (tmp_path / "r.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
    rows = list(read_jsonl(tmp_path / "r.jsonl"))
    assert rows[0] == {"instruction": "Summarize.", "input": "a text", "output": "a summary"}
    assert [Record(**r) for r in rows] == records


def test_splits_are_deterministic_and_disjoint(tmp_path):
    path = _write(
        tmp_path / "xsum.jsonl",
        [{"id": str(i), "document": f"doc {i}", "summary": f"sum {i}"} for i in range(40)],
    )
    a = load_splits(path, seed=3, valid=5, test=10)
    assert a == load_splits(path, seed=3, valid=5, test=10)
    assert a.test != load_splits(path, seed=4, valid=5, test=10).test
    docs = [{r.input for r in part} for part in (a.train, a.valid, a.test)]
    assert [len(d) for d in docs] == [25, 5, 10] and not (docs[0] & docs[1] | docs[0] & docs[2])
    smaller = load_splits(path, seed=3, train=7, valid=5, test=10)
    assert smaller.test == a.test and len(smaller.train) == 7  # test set independent of train size


def test_personachat_splits_by_user(tmp_path):
    splits = load_splits(_personachat(tmp_path), valid=5, test=10)
    users = [{r.user for r in part} for part in (splits.train, splits.valid, splits.test)]
    assert [len(u) for u in users] == [15, 5, 10]
    assert not (users[0] & users[2] or users[0] & users[1] or users[1] & users[2])
    assert len(splits.train) == 15 * 4  # every reply of a training user
    last = splits.test[0]
    u = last.user[1:]
    assert last.output == f"r{u}-3"  # held-out users are scored on their last reply ...
    assert f"Them: p{u}-3" in last.input and f"You: r{u}-2" in last.input  # ... in context


def test_purchase_files_are_not_text_datasets(tmp_path):
    """Recommendation trains on item codes (personalization.atspeed), never on title text."""
    rows = [{"user_id": f"b{u}", "history": ["a", "b"], "test": ["c"]} for u in range(9)]
    with pytest.raises(DataError, match="unknown dataset 'beauty'"):
        load_splits(_write(tmp_path / "beauty.jsonl", rows), valid=2, test=5)


def test_examples_use_the_chat_template_and_end_in_eos(tiny_llama):
    record = Record("Summarize.", "word " * 400, "short")
    example = to_example(tiny_llama, record, max_prompt_tokens=100)
    assert len(example.prompt) <= 100
    text = tiny_llama.tokenizer.decode(example.prompt)
    assert text.startswith("<|im_start|>user\nSummarize.") and text.endswith("assistant\n")
    assert example.target[-1] == tiny_llama.tokenizer.eos_token_id
    keep_end = to_example(
        tiny_llama, Record("R.", "old " * 200 + "newest", "x"), keep="end", max_prompt_tokens=60
    )
    assert "newest" in tiny_llama.tokenizer.decode(keep_end.prompt)
    with pytest.raises(DataError, match="leaves no room"):
        to_example(tiny_llama, record, max_prompt_tokens=5)


def test_bad_files_get_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_splits(tmp_path / "xsum.jsonl")
    (tmp_path / "xsum.jsonl").write_text('{"id": 1, "document": "d", "summary": "s"}\nnot json\n')
    with pytest.raises(DataError, match=r"xsum.jsonl:2: not a JSON line"):
        load_splits(tmp_path / "xsum.jsonl")
    (tmp_path / "novels.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match="unknown dataset 'novels'"):
        load_splits(tmp_path / "novels.jsonl")
    (tmp_path / "sciq.jsonl").write_text('{"id": "1", "question": "q"}\n' * 5)
    with pytest.raises(DataError, match=r"lacks \['answer'\]"):
        load_splits(tmp_path / "sciq.jsonl", valid=1, test=1)


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not at {SHARED} (set SPA_DATA_DIR)")
@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_every_shared_dataset_loads(dataset, tiny_llama):
    splits = load_splits(SHARED / f"{dataset}.jsonl", valid=10, test=20)
    assert splits.dataset == dataset and len(splits.test) == 20 and splits.train
    for record in splits.train[:5] + splits.test[:5]:
        assert record.instruction and record.input and record.output
        example = to_example(tiny_llama, record, max_prompt_tokens=256, keep=splits.keep)
        assert len(example.prompt) <= 256 and len(example.target) >= 2
        if dataset == "coqa":  # a story cut to fit keeps the question it ends with
            question = record.input.rsplit("Question:", 1)[1].strip()
            assert question in tiny_llama.tokenizer.decode(example.prompt)
