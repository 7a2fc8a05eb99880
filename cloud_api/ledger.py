"""What a session costs, as its events and its record report it: running totals (recorded when the
session ends, summed in `done`) and the token being made (its `token` event's timings and bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.messages import SessionTotals


@dataclass
class StepCost:
    """What producing one token cost (the token event's timings and bytes)."""

    cloud_s: float = 0.0
    device_wait_s: float = 0.0
    bytes_to_device: int = 0
    bytes_from_device: int = 0
    request_id: int | None = None


class Ledger:
    """A session's books: `totals` so far and `step`, the token being made."""

    def __init__(self):
        self.totals = SessionTotals()
        self.step = StepCost()

    def next_token(self) -> StepCost:
        self.step = StepCost()
        return self.step

    def sent(self, size: int) -> None:
        self.totals.bytes_to_device += size
        self.step.bytes_to_device += size

    def received(self, size: int) -> None:
        self.totals.bytes_from_device += size
        self.step.bytes_from_device += size

    def asked(self, request_id: int, positions: int) -> None:
        """A side request for `positions` tap positions (all rows)."""
        self.totals.device_contacts += 1
        self.totals.tap_positions += positions
        self.step.request_id = request_id

    def waited(self, seconds: float, expired: bool) -> None:
        self.totals.device_wait_s += seconds
        self.step.device_wait_s += seconds
        self.totals.fallbacks += expired

    def token(self, branch: str, cloud_s: float) -> StepCost:
        """The token made: its branch and the cloud's compute for it."""
        self.step.cloud_s = cloud_s
        self.totals.tokens += 1
        self.totals.device_tokens += branch == "device"
        self.totals.cloud_s += cloud_s
        return self.step
