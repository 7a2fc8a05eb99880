"""The device's private store: one directory holding a database and the side network's files.

    <dir>/device.db          history, training runs, checkpoints, generation logs (SQLAlchemy;
                             SQLite by default, any database URL accepted)
    <dir>/checkpoints/       side network + gate + optimizer state (safetensors, atomic writes)
    <dir>/features/          taps fetched from the cloud for the history (safetensors cache)
    <dir>/head/              the backbone's frozen final norm + LM head, per weight fingerprint

Every database write is one transaction, so a crash leaves the last committed state; a checkpoint
row is written only after its file is safely in place. The schema carries a version number and a
store of another version is refused with a message instead of being misread.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, Text, create_engine, event
from sqlalchemy import select as sql_select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from device_agent.errors import StoreError

SCHEMA_VERSION = 1


def now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict: JSON, list: JSON}


class Meta(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class HistoryItem(Base):
    """One piece of the user's history: a prompt/response pair, or free text (`instruction`
    is then the device's standing instruction for free text)."""

    __tablename__ = "history"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))  # "pair" | "text" | "purchase"
    instruction: Mapped[str] = mapped_column(Text)
    input: Mapped[str] = mapped_column(Text, default="")
    output: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=now)


class TrainingRun(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    setting: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="running")  # running|finished|failed
    config: Mapped[dict] = mapped_column(default=dict)
    examples: Mapped[int] = mapped_column(Integer, default=0)
    valid_examples: Mapped[int] = mapped_column(Integer, default=0)
    feature_passes: Mapped[int] = mapped_column(Integer, default=0)
    epochs_done: Mapped[int] = mapped_column(Integer, default=0)
    epochs: Mapped[list] = mapped_column(default=list)  # per epoch: train / validation losses
    calibration: Mapped[dict] = mapped_column(default=dict)
    seconds: Mapped[dict] = mapped_column(default=dict)
    checkpoint: Mapped[str] = mapped_column(Text, default="")  # path, relative to the store
    error: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[datetime] = mapped_column(default=now)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class Checkpoint(Base):
    """A finished run's checkpoint: the one generation uses is the newest."""

    __tablename__ = "checkpoints"
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    path: Mapped[str] = mapped_column(Text)  # relative to the store
    setting: Mapped[str] = mapped_column(String(16))
    epoch: Mapped[int] = mapped_column(Integer)
    threshold: Mapped[float | None] = mapped_column(Float, default=None)
    target_usage: Mapped[float | None] = mapped_column(Float, default=None)
    usage: Mapped[float | None] = mapped_column(Float, default=None)
    parameters: Mapped[int] = mapped_column(Integer)
    parameters_pct: Mapped[float] = mapped_column(Float)  # of the backbone's
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=now)


class GenerationLog(Base):
    """One generation and what it cost (totals and every token's share)."""

    __tablename__ = "generations"
    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[str] = mapped_column(String(64), default="")
    setting: Mapped[str] = mapped_column(String(16))
    strict: Mapped[bool] = mapped_column(Boolean, default=False)
    profile: Mapped[str] = mapped_column(String(32), default="")
    prompt: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16))  # finished | failed | cancelled ...
    error: Mapped[str] = mapped_column(Text, default="")
    totals: Mapped[dict] = mapped_column(default=dict)  # Accounts.summary()
    tokens: Mapped[list] = mapped_column(default=list)  # per token: id, branch, costs
    created_at: Mapped[datetime] = mapped_column(default=now)


class Store:
    """An initialised device directory (see the module docstring)."""

    def __init__(self, root: str | Path, database_url: str | None = None):
        self.root = Path(root).expanduser()
        if not (self.root / "checkpoints").is_dir():
            raise StoreError(f"{self.root} is not a device directory; run `spa device init` first")
        self.engine = _engine(database_url or _database_url(self.root))
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        try:
            version = self.get("schema_version")
        except SQLAlchemyError as exc:
            raise StoreError(f"{self.root}: unreadable device database ({exc})") from None
        if version != str(SCHEMA_VERSION):
            raise StoreError(
                f"{self.root}: device store schema version {version}, this spa-demo reads "
                f"version {SCHEMA_VERSION}"
            )

    @classmethod
    def create(
        cls, root: str | Path, meta: dict[str, str], database_url: str | None = None
    ) -> Store:
        """Make a new device directory (private to this user) and its database."""
        root = Path(root).expanduser()
        if (root / "checkpoints").is_dir():
            raise StoreError(f"{root} already holds a device; use another --dir or remove it")
        for sub in ("", "checkpoints", "features", "head"):
            (root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        if database_url:  # remembered, so `Store(root)` finds the database again
            (root / "database_url").write_text(database_url)
        url = _database_url(root)
        engine = _engine(url)
        Base.metadata.create_all(engine)
        with sessionmaker(engine)() as s, s.begin():
            for key, value in {**meta, "schema_version": str(SCHEMA_VERSION)}.items():
                s.merge(Meta(key=key, value=value))
        engine.dispose()
        if url.startswith("sqlite:///"):
            os.chmod(url.removeprefix("sqlite:///"), 0o600)  # it holds the bearer token
        return cls(root, database_url)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One atomic unit of work: committed whole, or rolled back whole."""
        with self._sessions() as s, s.begin():
            yield s

    # ---- meta ------------------------------------------------------------------------------
    def get(self, key: str) -> str | None:
        with self._sessions() as s:
            row = s.get(Meta, key)
            return None if row is None else row.value

    def set(self, **values: str) -> None:
        with self.transaction() as s:
            for key, value in values.items():
                s.merge(Meta(key=key, value=value))

    # ---- history ---------------------------------------------------------------------------
    def add_items(self, items: list[dict[str, Any]]) -> list[int]:
        """Add history items in one transaction (all or none); returns their ids."""
        try:
            with self.transaction() as s:
                rows = [HistoryItem(**item) for item in items]
                s.add_all(rows)
                s.flush()
                return [r.id for r in rows]
        except (SQLAlchemyError, TypeError) as exc:
            raise StoreError(f"could not add the history items (none added): {exc}") from None

    def items(self) -> list[HistoryItem]:
        with self._sessions() as s:
            return list(s.scalars(sql_select(HistoryItem).order_by(HistoryItem.id)))

    def delete_items(self, ids: list[int]) -> int:
        """Delete items by id (all or none); returns how many were deleted."""
        ids = sorted(set(ids))
        with self.transaction() as s:
            rows = [s.get(HistoryItem, i) for i in ids]
            missing = [i for i, r in zip(ids, rows, strict=True) if r is None]
            if missing:
                raise StoreError(f"no history item {missing[0]}")
            for row in rows:
                s.delete(row)
            return len(rows)

    # ---- runs and checkpoints ----------------------------------------------------------------
    def start_run(self, setting: str, config: dict) -> TrainingRun:
        with self.transaction() as s:
            run = TrainingRun(setting=setting, config=config)
            s.add(run)
            s.flush()
            return run

    def update_run(self, run_id: int, **fields: Any) -> None:
        with self.transaction() as s:
            run = s.get(TrainingRun, run_id)
            for key, value in fields.items():
                setattr(run, key, value)

    def run(self, run_id: int) -> TrainingRun | None:
        with self._sessions() as s:
            return s.get(TrainingRun, run_id)

    def runs(self) -> list[TrainingRun]:
        with self._sessions() as s:
            return list(s.scalars(sql_select(TrainingRun).order_by(TrainingRun.id)))

    def add_checkpoint(self, run_id: int, **fields: Any) -> Checkpoint:
        with self.transaction() as s:
            row = Checkpoint(run_id=run_id, **fields)
            s.add(row)
            s.get(TrainingRun, run_id).finished_at = now()
            s.flush()
            return row

    def checkpoints(self) -> list[Checkpoint]:
        with self._sessions() as s:
            return list(s.scalars(sql_select(Checkpoint).order_by(Checkpoint.id)))

    def current_checkpoint(self, setting: str | None = None) -> Checkpoint | None:
        """The newest checkpoint (of `setting`, if given)."""
        with self._sessions() as s:
            query = sql_select(Checkpoint).order_by(Checkpoint.id.desc()).limit(1)
            if setting is not None:
                query = query.where(Checkpoint.setting == setting)
            return s.scalars(query).first()

    # ---- generation logs ---------------------------------------------------------------------
    def log_generation(self, **fields: Any) -> int:
        with self.transaction() as s:
            row = GenerationLog(**fields)
            s.add(row)
            s.flush()
            return row.id

    def generations(self, limit: int = 20) -> list[GenerationLog]:
        with self._sessions() as s:
            query = sql_select(GenerationLog).order_by(GenerationLog.id.desc()).limit(limit)
            return list(s.scalars(query))

    def path(self, relative: str) -> Path:
        return self.root / relative


def _database_url(root: Path) -> str:
    named = root / "database_url"
    return named.read_text().strip() if named.is_file() else f"sqlite:///{root / 'device.db'}"


def _engine(url: str):
    engine = create_engine(url, json_serializer=lambda o: json.dumps(o, default=str))
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record):  # durable, concurrent readers, enforced foreign keys
            cursor = conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine
