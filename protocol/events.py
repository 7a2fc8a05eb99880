"""The NDJSON events of a session's stream, one typed model per kind, keyed on `event`.

    start ─▶ (taps* side_request* token)* ─▶ done

Pull mode (the default): a `side_request` carries the taps of every position the device has not
seen. Streamed mode: a `taps` event carries each position's taps as soon as the cloud has them
(the prompt's after prefill, then one per token), and a `side_request` carries none — it asks
for g at position `at`, which the device has usually computed already.

The cloud builds each event with these models and writes it with `to_line`; the device reads each
line with `parse_event`. A `side_request` asks for g(x) at its last position and carries the taps
of every position the device has not confirmed, from `start` on (docs/protocol.md).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, TypeAdapter
from torch import Tensor

from personalization.codecs import TapCodec
from personalization.config import TapEncoding, WireDtype
from protocol import wire
from protocol.messages import RecommendedItem, RunAheadTotals, SessionFacts, SessionTotals

#: run-ahead adds `correction`: a device token that replaced the backbone's draft
Branch = Literal["cloud", "device", "fallback", "correction"]
#: how a session ended (`created` and `running` are the live states before it)
EndStatus = Literal["finished", "cancelled", "expired", "failed"]


class _Event(BaseModel):
    event: str  # each kind narrows it to its own name (declared here, so it is written first)

    def to_line(self) -> bytes:
        """One NDJSON line: compact JSON and a newline (its length is what the books count)."""
        return self.model_dump_json().encode() + b"\n"


class StartEvent(SessionFacts, _Event):
    """Generation has started: what the session's side requests will look like."""

    event: Literal["start"] = "start"
    prompt_ids: list[int] | None = Field(
        None,
        description="run-ahead with repetition controls: the prompt's token ids, which the "
        "device's verdicts penalise as the backbone's drafts do",
    )


class _Taps(_Event):
    """Encoded taps: `shape` [positions, R, H] per row, `taps` base64 of `wire.encode_taps`."""

    start: int = Field(description="the first position these taps belong to")
    positions: int
    shape: list[int]
    rows: int = 1
    shared: int = 0
    dtype: WireDtype = Field(description="of g(x), and of raw-le taps")
    encoding: TapEncoding = "raw-le"
    taps: str

    def decode_taps(self, codec: TapCodec) -> Tensor:
        """The taps as float32 [rows, positions, R, H] (a `wire.WireError` if malformed, or if
        `codec` is not the encoding the event names)."""
        if codec.name != self.encoding:
            raise wire.WireError(f"taps are {self.encoding}, the device expects {codec.name}")
        raw = wire.b64decode(self.taps, what="taps")
        return wire.decode_taps(raw, codec, self.rows, self.shared, self.shape)


class TapsEvent(_Taps):
    """Streamed mode: new positions' taps, pushed as soon as the backbone computed them."""

    event: Literal["taps"] = "taps"


class SideRequestEvent(_Taps):
    """Ask the device for g(x) [rows, H] at the last position, before `deadline_s`.

    `taps` is base64 of `wire.encode_taps`: the first `shared` positions once (beam search: the
    prompt all rows share), then each row's other positions; `shape` is [positions, R, H] per
    row. `reorder` lists, per current row, the row of the device's cache it continues (the beams'
    reorders since the device's last answer; None when unchanged).
    """

    event: Literal["side_request"] = "side_request"
    request_id: int
    at: int = Field(-1, description="the position g is asked for (-1: the last one sent)")
    reorder: list[int] | None = None
    deadline_s: float


class TreeRequestEvent(_Taps):
    """A recommendation session asks for g(x) over one target pass of its token tree.

    `taps` are the pass's positions [rows, positions, R, H] (padding included); `mask`
    [rows, positions, S] says which cache slots each position attends to (its prompt and its
    ancestors, itself last; S = the slots before the pass + `positions`); `keep` [rows, S'] is the
    cut of the device's side cache to apply first (the slots the kept beams need), None when
    unchanged. The answer is g for the `real` positions [rows, positions] only, row-major."""

    event: Literal["tree_request"] = "tree_request"
    request_id: int
    mask: str = Field(description="base64 of wire.pack_bits")
    mask_shape: list[int]
    real: str = Field(description="base64 of wire.pack_bits, [rows, positions]")
    keep: list[list[int]] | None = None
    deadline_s: float

    def decode_mask(self) -> Tensor:
        return wire.unpack_bits(wire.b64decode(self.mask, what="mask"), self.mask_shape)

    def decode_real(self) -> Tensor:
        shape = [self.rows, self.positions]
        return wire.unpack_bits(wire.b64decode(self.real, what="real"), shape, what="real")


class RecommendedEvent(_Event):
    """A recommendation session's result (before `done`): the top-K items, best first."""

    event: Literal["recommended"] = "recommended"
    items: list[RecommendedItem]
    target_passes: int
    acceptance: float | None = None
    seconds: float


class DraftEvent(_Taps):
    """Run-ahead: the backbone's token `index` of `epoch`, drafted without waiting, with the new
    positions' taps and f(x) [H] at the drafted position (base64, `dtype`): what the device needs
    to apply its own gate and side network and accept or correct the draft. `last`: no draft
    follows unless this one is corrected (EOS or the token limit)."""

    event: Literal["draft"] = "draft"
    index: int
    epoch: int
    id: int
    text: str
    f: str
    cloud_ms: float
    last: bool = False

    def decode_f(self) -> Tensor:
        raw = wire.b64decode(self.f, what="f")
        return wire.decode(raw, self.dtype, self.shape[-1:], what="f(x)").float()


class CorrectedEvent(_Event):
    """Run-ahead: the cloud took the device's token at `index`; drafts after it are withdrawn
    and the next drafts belong to `epoch`."""

    event: Literal["corrected"] = "corrected"
    index: int
    epoch: int
    id: int
    text: str
    withdrawn: int
    cloud_ms: float


class TokenEvent(_Event):
    """One output token and what producing it cost the cloud."""

    event: Literal["token"] = "token"
    index: int
    id: int
    text: str
    branch: Branch
    gate_prob: float | None = Field(description="the gate's p(device); None in strict mode")
    request_id: int | None = Field(description="the side request that shaped it, if any")
    cloud_ms: float
    device_wait_ms: float
    bytes_to_device: int
    bytes_from_device: int


class DoneEvent(_Event):
    """The last event: how the session ended and what it cost."""

    event: Literal["done"] = "done"
    status: EndStatus
    reason: str = ""
    steps: int = Field(0, description="decoding steps (beam search: one per step of all beams)")
    M: float = Field(description="device round trips per decoding step")
    totals: SessionTotals
    run_ahead: RunAheadTotals | None = None


Event = Annotated[
    StartEvent
    | TapsEvent
    | SideRequestEvent
    | TokenEvent
    | DraftEvent
    | CorrectedEvent
    | TreeRequestEvent
    | RecommendedEvent
    | DoneEvent,
    Field(discriminator="event"),
]
_EVENT: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(line: str | bytes) -> Event:
    """One NDJSON line → its typed event (pydantic's ValidationError if it is not one)."""
    return _EVENT.validate_json(line)
