"""Per-round metrics of federated runs, persisted with SQLAlchemy (SQLite by default), and their
summary: a Markdown table and a PNG plot."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import JSON, Integer, String, Text, create_engine, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


class Base(DeclarativeBase):
    pass


class RoundMetric(Base):
    """One node's (or the aggregate's, node = "all") metrics of one round and phase."""

    __tablename__ = "round_metrics"
    id: Mapped[int] = mapped_column(primary_key=True)
    run: Mapped[str] = mapped_column(String(64))
    strategy: Mapped[str] = mapped_column(String(16))
    round: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str] = mapped_column(String(16))  # train | evaluate
    node: Mapped[str] = mapped_column(String(32))
    metrics: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=lambda: datetime.now(UTC))


class Failure(Base):
    """A node whose reply was an error (it did not count in the round)."""

    __tablename__ = "failures"
    id: Mapped[int] = mapped_column(primary_key=True)
    run: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str] = mapped_column(String(16))
    node: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text)


class Records:
    def __init__(self, url: str):
        self.engine = create_engine(url)
        try:
            Base.metadata.create_all(self.engine)
        except OperationalError:  # another process (the UI, the ServerApp) created them first
            Base.metadata.create_all(self.engine)

    def add(self, row: Base) -> None:
        with Session(self.engine) as s, s.begin():
            s.add(row)

    def metrics(self, run: str, node: str | None = "all") -> list[RoundMetric]:
        """The aggregates (`all`), one node's rows, or (None) every row of the run."""
        with Session(self.engine) as s:
            q = select(RoundMetric).where(RoundMetric.run == run)
            if node is not None:
                q = q.where(RoundMetric.node == node)
            return list(s.scalars(q.order_by(RoundMetric.round, RoundMetric.phase)))

    def failures(self, run: str) -> list[Failure]:
        with Session(self.engine) as s:
            return list(s.scalars(select(Failure).where(Failure.run == run)))


COLUMNS = (
    "train-loss",
    "rouge-l",
    "rouge-l-base",
    "item-nll",
    "item-nll-backbone",
    "usage",
    "bytes-to-cloud",
    "bytes-to-server",
    "round-seconds",
)


def table(records: Records, run: str) -> str:
    """Rounds as rows, the aggregated metrics as columns (Markdown): the run's task's metrics
    (Rouge-L, or Recall / NDCG @ K) and what it cost."""
    rows: dict[int, dict] = {}
    for m in records.metrics(run):
        rows.setdefault(m.round, {}).update(m.metrics)
    present = {key for values in rows.values() for key in values}
    ranking = sorted(k for k in present if k.startswith(("recall@", "ndcg@")))  # Beauty's task
    shown = [c for c in COLUMNS if c in present]
    columns = shown[:1] + ranking + shown[1:]  # train loss first, then the task's metrics
    failed: dict[int, int] = {}
    for f in records.failures(run):
        failed[f.round] = failed.get(f.round, 0) + 1
    lines = [
        "| round | " + " | ".join(columns) + " | failed replies |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for rnd, values in sorted(rows.items()):
        cells = [_fmt(values.get(c)) for c in columns]
        lines.append(f"| {rnd} | " + " | ".join(cells) + f" | {failed.get(rnd, 0)} |")
    return "\n".join(lines)


def plot(records: Records, run: str, path: Path) -> Path:
    """Train loss and held-out Rouge-L (vs base) by round, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[int, dict] = {}
    for m in records.metrics(run):
        rows.setdefault(m.round, {}).update(m.metrics)
    rounds = sorted(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(rounds, [rows[r].get("train-loss") for r in rounds], marker="o")
    ax1.set(title="train loss", xlabel="round")
    for key in ("rouge-l", "rouge-l-base"):
        ax2.plot(rounds, [rows[r].get(key) for r in rounds], marker="o", label=key)
    ax2.set(title="held-out Rouge-L", xlabel="round")
    for ax in (ax1, ax2):
        ax.set_xticks(rounds)
    ax2.legend()
    fig.suptitle(run)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3f}"
