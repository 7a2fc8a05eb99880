"""A remote generation's books on the device: each token's share of the bill (`TokenCost`), the
running totals (`Accounts`), and what the side requests since the last token cost (`Pending`).
"""

from __future__ import annotations

from dataclasses import dataclass

from personalization.latency import Books


@dataclass
class TokenCost:
    """One generated token and its share of the bill (seconds, bytes)."""

    index: int
    id: int
    text: str
    branch: str  # cloud | device | fallback
    gate_prob: float | None
    cloud_s: float = 0.0
    device_s: float = 0.0
    net_s: float = 0.0
    bytes_to_device: int = 0
    bytes_from_device: int = 0
    contacts: int = 0

    @property
    def total_s(self) -> float:
        return self.cloud_s + self.device_s + self.net_s


@dataclass
class Accounts(Books):
    """Running totals of a generation: the latency model's `Books` (tokens, steps, contacts,
    tap positions, bytes each way, T_cloud + T_device + T_net = T_total) and what only a remote
    device sees."""

    fallbacks: int = 0
    wall_s: float = 0.0  # stream opened → last event, measured on the device
    t_device_ahead: float = 0.0  # streamed taps: side-network seconds spent before being asked
    resumes: int = 0  # times the event stream broke and was resumed where it stopped
    corrections: int = 0  # run-ahead: drafts the device replaced with its own token
    withdrawn: int = 0  # run-ahead: drafts the cloud computed and threw away after corrections

    def add(self, token: TokenCost) -> None:
        self.tokens += 1
        self.steps += 1
        self.device_tokens += token.branch in ("device", "correction")
        self.corrections += token.branch == "correction"
        self.fallbacks += token.branch == "fallback"
        self.contacts += token.contacts
        self.bytes_to_device += token.bytes_to_device
        self.bytes_from_device += token.bytes_from_device
        self.t_cloud += token.cloud_s
        self.t_device += token.device_s
        self.t_net += token.net_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def summary(self) -> dict:
        return super().summary() | {"tokens_per_s": self.tokens_per_s}


@dataclass
class Pending:
    """Side requests answered since the last token event."""

    device_s: float = 0.0
    bytes_to_device: int = 0
    bytes_from_device: int = 0
    contacts: int = 0
    gate_prob: float | None = None  # strict mode: the device's own gate decided
    sigma: bool = True
