"""What a session costs, as its events and its record report it: running totals (recorded when the
session ends, summed in `done`) and the token being made (its `token` event's timings and bytes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from personalization.latency import Books
from protocol.messages import SessionTotals


@dataclass
class StepCost:
    """What producing one token cost (the token event's timings and bytes)."""

    cloud_s: float = 0.0
    device_wait_s: float = 0.0
    bytes_to_device: int = 0
    bytes_from_device: int = 0
    request_id: int | None = None


@dataclass
class SessionBooks(Books):
    """A session's books: the latency model's `Books` (contacts, tap positions, bytes each way,
    T_cloud) and what only the cloud sees; reported in the protocol's names by `totals`."""

    fallbacks: int = 0  # side requests whose deadline passed
    device_wait_s: float = 0.0  # from each side request to its answer
    wall_s: float = 0.0  # stream opened → done

    def totals(self) -> SessionTotals:
        """As the protocol reports them (the `done` event, the session's record)."""
        values = {_WIRE_NAMES.get(k, k): v for k, v in asdict(self).items()}
        return SessionTotals(**{k: v for k, v in values.items() if k in SessionTotals.model_fields})


#: the protocol's names of the books' figures, where they differ
_WIRE_NAMES = {"contacts": "device_contacts", "t_cloud": "cloud_s"}


class Ledger:
    """A session's running `books` and `step`, the token being made."""

    def __init__(self):
        self.books = SessionBooks()
        self.step = StepCost()

    def next_token(self) -> StepCost:
        self.step = StepCost()
        return self.step

    def sent(self, size: int) -> None:
        self.books.bytes_to_device += size
        self.step.bytes_to_device += size

    def received(self, size: int) -> None:
        self.books.bytes_from_device += size
        self.step.bytes_from_device += size

    def asked(self, request_id: int, positions: int) -> None:
        """A side request for `positions` tap positions (all rows)."""
        self.books.contacts += 1
        self.books.tap_positions += positions
        self.step.request_id = request_id

    def waited(self, seconds: float, expired: bool) -> None:
        self.books.device_wait_s += seconds
        self.step.device_wait_s += seconds
        self.books.fallbacks += expired

    def token(self, branch: str, cloud_s: float) -> StepCost:
        """The token made: its branch and the cloud's compute for it."""
        self.step.cloud_s = cloud_s
        self.books.tokens += 1
        self.books.device_tokens += branch == "device"
        self.books.t_cloud += cloud_s
        return self.step
