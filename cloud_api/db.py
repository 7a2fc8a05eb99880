"""Records (SQLAlchemy 2): registered devices and every session with what it cost.

SQLite by default, any SQLAlchemy URL otherwise. Only a hash of each device's bearer token is
stored, so a leaked database does not leak credentials.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import ForeignKey, String, create_engine, event, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

SCHEMA_LOCK = 0x5BA_C10D  # the PostgreSQL advisory lock replicas take to create the schema
#: session statuses: created → running → finished | cancelled | expired | failed
LIVE = ("created", "running")


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)  # naive UTC: portable across databases


class Base(DeclarativeBase):
    pass


class DeviceRow(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[datetime] = mapped_column(default=now)


class SessionRow(Base):
    """One generation session and its totals (filled in as it ends)."""

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="created")
    reason: Mapped[str] = mapped_column(String(200), default="")
    setting: Mapped[str] = mapped_column(String(16))
    strategy: Mapped[str] = mapped_column(String(16))
    strict: Mapped[bool] = mapped_column(default=False)
    threshold: Mapped[float] = mapped_column(default=0.5)
    rungs: Mapped[str] = mapped_column(String(200))  # comma-separated
    tap_dtype: Mapped[str] = mapped_column(String(16))
    deadline_s: Mapped[float]
    prompt_tokens: Mapped[int]
    max_new_tokens: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=now)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # totals
    tokens: Mapped[int] = mapped_column(default=0)
    device_tokens: Mapped[int] = mapped_column(default=0)
    device_contacts: Mapped[int] = mapped_column(default=0)  # side requests sent
    fallbacks: Mapped[int] = mapped_column(default=0)  # side requests whose deadline passed
    tap_positions: Mapped[int] = mapped_column(default=0)
    bytes_to_device: Mapped[int] = mapped_column(default=0)
    bytes_from_device: Mapped[int] = mapped_column(default=0)
    cloud_s: Mapped[float] = mapped_column(default=0.0)  # backbone, gate and head compute
    device_wait_s: Mapped[float] = mapped_column(default=0.0)  # waiting for g(x) answers
    wall_s: Mapped[float] = mapped_column(default=0.0)  # stream opened → done


class Records:
    """The database behind the API; short transactions, safe to call from any thread."""

    def __init__(self, url: str):
        self.url = make_url(url)
        kwargs: dict = {}
        if self.url.drivername.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False}
            database = self.url.database
            if database in (None, "", ":memory:"):
                kwargs["poolclass"] = StaticPool  # one shared in-memory database
            else:
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.url.drivername.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        with self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":  # replicas starting at once on one
                # database: one creates the tables, the others wait for it, then find them
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})
            Base.metadata.create_all(connection)
        self.session = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    # ---- devices -------------------------------------------------------------------------------
    def add_device(self, device_id: str, name: str, token_hash: str) -> DeviceRow:
        row = DeviceRow(id=device_id, name=name, token_hash=token_hash)
        with self.session.begin() as db:
            db.add(row)
        return row

    def set_token_hash(self, device_id: str, token_hash: str) -> DeviceRow | None:
        """Replace a device's token (rotation), or make it match none (revocation)."""
        with self.session.begin() as db:
            row = db.get(DeviceRow, device_id)
            if row is not None:
                row.token_hash = token_hash
            return row

    def device_by_token_hash(self, token_hash: str) -> DeviceRow | None:
        with self.session() as db:
            return db.scalar(select(DeviceRow).where(DeviceRow.token_hash == token_hash))

    # ---- sessions ------------------------------------------------------------------------------
    def add_session(self, row: SessionRow) -> SessionRow:
        with self.session.begin() as db:
            db.add(row)
        return row

    def update_session(self, session_id: str, **fields) -> None:
        with self.session.begin() as db:
            row = db.get(SessionRow, session_id)
            if row is not None:
                for name, value in fields.items():
                    setattr(row, name, value)

    def get_session(self, session_id: str) -> SessionRow | None:
        with self.session() as db:
            return db.get(SessionRow, session_id)

    def sessions_of(self, device_id: str, limit: int = 100) -> list[SessionRow]:
        query = (
            select(SessionRow)
            .where(SessionRow.device_id == device_id)
            .order_by(SessionRow.created_at.desc())
            .limit(limit)
        )
        with self.session() as db:
            return list(db.scalars(query))

    def close_stale(self, reason: str) -> int:
        """Mark sessions a previous server process left live as expired (their state is gone)."""
        with self.session.begin() as db:
            rows = db.scalars(select(SessionRow).where(SessionRow.status.in_(LIVE))).all()
            for row in rows:
                row.status, row.reason, row.finished_at = "expired", reason, now()
            return len(rows)


def _sqlite_pragmas(connection, _record) -> None:
    """WAL lets the API read while a finishing session writes its totals; with WAL, NORMAL
    sync stays consistent after a crash and spares an fsync per commit."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
