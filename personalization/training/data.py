"""Records in the paper's format and the loaders that turn the shared datasets into them.

A `Record` is `{"instruction", "input", "output"}` (plus the `user` it belongs to, for the
per-user sets). `load_splits(path)` reads one file of `../shared/data/` (the dataset is named by
the file's stem unless given) and splits it deterministically by seed:

- document / question sets (xsum, cnndm, sciq, coqa) split by record;
- personachat splits by *user*: the training users' replies train, other users' last replies
  test (a user's persona and earlier replies are their private history).

Purchase histories (beauty) are not text records: recommendation trains on item codes
(`personalization.atspeed`).

`Example`s are what the model sees: the prompt's token ids (in the backbone's chat template when it
has one, the input truncated to fit) and the target's ids ending in EOS.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from personalization.errors import SpaError

if TYPE_CHECKING:  # annotations only: importing this module stays light
    from personalization.backbone.frozen import Backbone


@dataclass(frozen=True)
class Record:
    instruction: str
    input: str
    output: str
    user: str | None = None

    def to_json(self) -> str:
        row = asdict(self)
        if self.user is None:
            del row["user"]
        return json.dumps(row, ensure_ascii=False)


@dataclass(frozen=True)
class Splits:
    dataset: str
    train: list[Record]
    valid: list[Record]
    test: list[Record]
    max_new_tokens: int  # a generation budget that fits the dataset's references
    keep: str  # which end of an over-long input `to_example` keeps


@dataclass(frozen=True)
class Example:
    """Token ids of one record: the model reads `prompt` and must produce `target`."""

    prompt: tuple[int, ...]
    target: tuple[int, ...]  # ends with EOS

    @property
    def ids(self) -> tuple[int, ...]:
        return self.prompt + self.target

    @property
    def key(self) -> str:
        """Content key: identical token ids share cached features, whatever the file said."""
        text = f"{list(self.prompt)}|{list(self.target)}".encode()
        return hashlib.sha256(text).hexdigest()[:32]


class DataError(SpaError, ValueError):
    """A data file that cannot be read as the dataset it claims to be."""


# ---- reading and writing the paper's format ---------------------------------------------------
def read_jsonl(path: str | Path) -> Iterator[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{n}: not a JSON line ({exc.msg})") from None


# ---- one converter per dataset ------------------------------------------------------------------
def _fields(row: dict, *names: str) -> list:
    missing = [n for n in names if n not in row]
    if missing:
        raise DataError(f"record {row.get('id', row.get('user_id', '?'))} lacks {missing}")
    return [row[n] for n in names]


def _xsum(row: dict) -> Record:
    document, summary = _fields(row, "document", "summary")
    return Record("Summarize the following article in one sentence.", document, summary)


def _cnndm(row: dict) -> Record:
    article, highlights = _fields(row, "article", "highlights")
    return Record("Write the highlights of the following news article.", article, highlights)


def _sciq(row: dict) -> Record:
    question, answer = _fields(row, "question", "answer")
    return Record("Answer the science question with a short phrase.", question, answer)


def _coqa(row: dict) -> Record:
    story, question, answer = _fields(row, "story", "question", "answer")
    return Record(
        "Answer the question about the story in one short sentence.",
        f"{story}\n\nQuestion: {question}",
        answer,
    )


PERSONACHAT_INSTRUCTION = (
    "You are chatting with someone you just met. Reply to their last message in one short, "
    "casual sentence."
)


def personachat_records(row: dict, context_turns: int = 2) -> list[Record]:
    """One record per reply: the last `context_turns` exchanges and the partner's utterance."""
    user, turns = _fields(row, "user_id", "turns")
    records = []
    for i, turn in enumerate(turns):
        lines = []
        for earlier in turns[max(0, i - context_turns) : i]:
            lines += [f"Them: {earlier['partner']}", f"You: {earlier['reply']}"]
        lines.append(f"Them: {turn['partner']}")
        records.append(Record(PERSONACHAT_INSTRUCTION, "\n".join(lines), turn["reply"], user))
    return records


@dataclass(frozen=True)
class _Spec:
    convert: Callable[[dict], Record] | None  # record-level sets
    max_new_tokens: int
    keep: str = "start"  # which end of an over-long input to keep: documents their beginning,
    # dialogues their most recent end, a story its question


DATASETS: dict[str, _Spec] = {
    "xsum": _Spec(_xsum, 48),
    "cnndm": _Spec(_cnndm, 96),
    "sciq": _Spec(_sciq, 16),
    "coqa": _Spec(_coqa, 24, keep="end"),  # the question ends the input: a cut story keeps it
    "personachat": _Spec(None, 32, keep="end"),
}


def load_splits(
    path: str | Path,
    dataset: str | None = None,
    *,
    seed: int = 0,
    train: int | None = None,
    valid: int = 50,
    test: int = 100,
) -> Splits:
    """Split a data file. Sizes count records, or users for personachat; the test and
    validation parts are drawn first, so they do not change when `train` does."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    name = dataset or path.name.split(".")[0]
    if name not in DATASETS:
        known = ", ".join(DATASETS)
        raise DataError(f"unknown dataset {name!r} (from {path.name}); one of {known}")
    rows = list(read_jsonl(path))
    rng = random.Random(seed)
    rng.shuffle(rows)
    if len(rows) < valid + test + 1:
        raise DataError(f"{path} has {len(rows)} rows, fewer than valid + test + 1")
    test_rows, valid_rows = rows[:test], rows[test : test + valid]
    train_rows = rows[test + valid :][:train]
    spec = DATASETS[name]
    if spec.convert is not None:
        parts = [[spec.convert(r) for r in part] for part in (train_rows, valid_rows, test_rows)]
    else:
        parts = [
            [r for row in train_rows for r in personachat_records(row)],
            [r for row in valid_rows for r in personachat_records(row)[-1:]],
            [r for row in test_rows for r in personachat_records(row)[-1:]],
        ]
    return Splits(name, *parts, max_new_tokens=spec.max_new_tokens, keep=spec.keep)


# ---- records → token ids ------------------------------------------------------------------------
def to_example(
    backbone: Backbone,
    record: Record,
    *,
    max_prompt_tokens: int = 512,
    max_target_tokens: int = 64,
    keep: str = "start",
) -> Example:
    """Tokenise a record; an over-long input is cut (keeping its `start` or its `end`)."""
    tok = backbone.tokenizer
    ids = tok(record.input, add_special_tokens=False)["input_ids"]
    budget, text = len(ids), record.input
    while True:
        prompt = backbone.encode_prompt(_prompt_text(record, text))
        over = len(prompt) - max_prompt_tokens
        if over <= 0:
            break
        budget -= over
        if budget < 1:
            raise DataError(f"max_prompt_tokens {max_prompt_tokens} leaves no room for the input")
        cut = ids[:budget] if keep == "start" else ids[-budget:]
        text = tok.decode(cut, skip_special_tokens=True)
    target = encode_target(backbone, record.output)
    return Example(tuple(prompt), (*target[:-1][: max_target_tokens - 1], target[-1]))


def to_examples(backbone: Backbone, records: Iterable[Record], **kwargs) -> list[Example]:
    return [to_example(backbone, r, **kwargs) for r in records]


def records_hash(records: Iterable[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(r.to_json().encode())
    return h.hexdigest()[:16]


def _prompt_text(record: Record, text: str) -> str:
    return f"{record.instruction}\n\n{text}" if text else record.instruction


def encode_target(backbone: Backbone, text: str) -> list[int]:
    """A target's token ids, ending in the EOS the model must learn to stop with."""
    eos = backbone.tokenizer.eos_token_id
    if eos is None:
        eos = min(backbone.eos_token_ids)
    return [*backbone.tokenizer(text, add_special_tokens=False)["input_ids"], int(eos)]
