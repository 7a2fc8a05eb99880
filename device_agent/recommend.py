"""Recommendation with the device's own side network: the cloud searches the catalogue's token
tree on its backbone and, once per target pass, sends the pass's taps; the device runs its side
network over them (its cache follows the tree: cut to the kept beams, grown by the new nodes)
and answers g(x) for the positions whose outputs the search reads. Its history and side network
never leave it; the gate's 2·H + 2 weights do, as in generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from device_agent.client import CloudClient
from device_agent.errors import CloudUnreachable, DeviceError
from personalization.atspeed.tree import gather_slots
from personalization.config import GATED_SETTINGS
from personalization.model import SPAModel
from protocol.events import DoneEvent, RecommendedEvent, TreeRequestEvent
from protocol.messages import GateIn, RecommendSessionIn


@dataclass
class RemoteRecommendation:
    client: CloudClient
    model: SPAModel  # the device's trained side network and gate
    history: Sequence[str]
    k: int = 10
    strategy: str = "beam"  # or speculative-strict
    gamma: int = 5
    deadline_s: float | None = None
    result: RecommendedEvent | None = None
    status: str = "created"
    error: str = ""
    contacts: int = 0
    bytes_to_device: int = 0
    bytes_from_device: int = 0
    session_id: str | None = field(default=None)

    def body(self) -> RecommendSessionIn:
        m = self.model
        gate = None
        if m.setting in GATED_SETTINGS:
            weight, bias = m.gate.linear.weight, m.gate.linear.bias
            gate = GateIn(weight=weight.detach().tolist(), bias=bias.detach().tolist())
        return RecommendSessionIn(
            history=list(self.history),
            k=self.k,
            strategy=self.strategy,
            gamma=self.gamma,
            setting=m.setting,
            threshold=m.config.threshold,
            gate=gate,
            rungs=list(m.rungs),
            tap_dtype=m.config.wire_dtype,
            tap_encoding=m.config.tap_encoding,
            deadline_s=self.deadline_s,
        )

    @torch.no_grad()
    def run(self) -> RecommendedEvent:
        """Open the session, answer every tree request, and return the items."""
        m = self.model
        if m.backbone.vocab_size <= self.client.facts().vocab_size:
            raise DeviceError(
                "this side network was trained on text, not on item codes: train one on the "
                "purchases first (`spa device train --target codes --setting lst`)"
            )
        session = self.client.open_recommendation(self.body())
        self.session_id = sid = session.session_id
        cache = m.side.new_cache()
        try:
            for event, size in self.client.events(sid):
                self.bytes_to_device += size
                if isinstance(event, TreeRequestEvent):
                    if event.keep is not None:
                        index = torch.tensor(event.keep, dtype=torch.long)
                        cache.kv = [
                            (gather_slots(k, index), gather_slots(v, index)) for k, v in cache.kv
                        ]
                    taps = event.decode_taps(m.codec).to(m.side_dtype)
                    g = m.wire(m.side(taps, cache, event.decode_mask()))[event.decode_real()]
                    self.bytes_from_device += self.client.answer(
                        sid, event.request_id, g, event.dtype
                    )
                    self.contacts += 1
                elif isinstance(event, RecommendedEvent):
                    self.result = event
                elif isinstance(event, DoneEvent):
                    self.status, self.error = event.status, event.reason
        except BaseException:
            self.client.cancel(sid)
            raise
        if self.status == "created":
            raise CloudUnreachable("the cloud ended the event stream without a `done` event")
        if self.result is None:
            raise DeviceError(f"the cloud could not recommend ({self.status}): {self.error}")
        return self.result
