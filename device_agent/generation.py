"""Generation from the device's side: open a cloud session, answer its side requests with the
private side network, and account for every token as it arrives.

Per token: cloud compute (the cloud's own measurement, in the token event), device compute
(measured here around the side network), network time = how long the cloud waited for the answer
minus the device's compute (so it includes the emulated link, HTTP and serialisation), bytes down
(the side-request lines as received) and up (the g(x) bodies sent), and device contacts.
T_total = T_cloud + T_device + T_net, per token and in total.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from pydantic import ValidationError

from device_agent.books import Accounts, TokenCost
from device_agent.client import CloudClient
from device_agent.errors import CloudUnreachable, DeviceError
from device_agent.tap_modes import MODES
from personalization.config import GATED_SETTINGS, DecodeConfig, TapMode
from personalization.model import SPAModel
from protocol import wire
from protocol.events import DoneEvent, Event, StartEvent
from protocol.messages import DecodingIn, GateIn, SessionIn, SessionOut


@dataclass
class RemoteGeneration:
    """A streaming generation through the cloud; iterate once for `TokenCost`s."""

    client: CloudClient
    model: SPAModel | None  # the private side network and gate; None for `base`
    prompt: str | list[int] | list[dict[str, str]]  # text, token ids or a conversation
    setting: str = "spa"
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    strict: bool = False  # keep the gate on the device: asked every token
    tap_mode: TapMode | None = None  # pull or streamed taps; None: the cloud's default
    chat: bool = True
    deadline_s: float | None = None
    on_end: Callable[[RemoteGeneration], None] | None = None
    tokens: list[TokenCost] = field(default_factory=list)
    accounts: Accounts = field(default_factory=Accounts)
    session: SessionOut | None = None
    status: str = "created"
    error: str = ""

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)

    def body(self) -> SessionIn:
        """The session request: prompt, decoding, and — the only learned numbers that leave
        the device — the gate's 2·H + 2 weights (not even those in strict mode)."""
        if self.setting != "base" and self.model is None:
            raise DeviceError(f"setting {self.setting} needs a trained side network")
        if self.strict and (
            self.setting != "spa" or self.model.rungs[-1] != self.model.backbone.num_layers
        ):
            raise DeviceError(
                "strict mode needs setting spa and the last rung L among the taps: the device "
                "then reads f(x) from the taps and applies its own gate (answering 0 when σ = 0)"
            )
        try:
            return self._body()
        except ValidationError as exc:  # refused here, as the cloud would refuse it (422)
            reasons = "; ".join(_reason(e) for e in exc.errors())
            raise DeviceError(f"the cloud would refuse this session: {reasons}") from None

    def _body(self) -> SessionIn:
        d = self.decode
        decoding = DecodingIn(
            strategy=d.strategy,
            max_new_tokens=d.max_new_tokens,
            temperature=d.temperature,
            top_p=d.top_p,
            num_beams=d.num_beams,
            seed=d.seed,
            repetition_penalty=d.repetition_penalty,
            no_repeat_ngram_size=d.no_repeat_ngram_size,
        )
        side: dict = {}
        if self.tap_mode == "run-ahead":
            model = self.model
            if self.setting != "spa" or model is None or self.decode.strategy == "beam":
                raise DeviceError(
                    "run-ahead needs setting spa and greedy or sampling (beam search stays "
                    "synchronous)"
                )
            if model.rungs[-1] != model.backbone.num_layers:
                raise DeviceError("run-ahead needs the last rung L among the side network's taps")
        if self.model is not None and self.setting != "base":
            cfg = self.model.config
            side = {
                "rungs": list(self.model.rungs),
                "tap_dtype": cfg.wire_dtype,
                "tap_encoding": cfg.tap_encoding,
                "tap_mode": self.tap_mode,
            }
            if self.setting in GATED_SETTINGS and self.tap_mode != "run-ahead":
                side["threshold"] = self.model.config.threshold
                if not self.strict:
                    gate = self.model.gate.linear
                    side["gate"] = GateIn(weight=_b64(gate.weight), bias=_b64(gate.bias))
        if self.deadline_s is not None:
            side["deadline_s"] = self.deadline_s
        return SessionIn(
            prompt=self.prompt,
            chat=self.chat,
            setting=self.setting,
            strict=self.strict,
            decoding=decoding,
            **side,
        )

    def __iter__(self) -> Iterator[TokenCost]:
        if self.status != "created":
            raise RuntimeError("a RemoteGeneration streams once")
        self.status = "running"
        started = time.perf_counter()
        try:
            self.session = self.client.open_session(self.body())
            mode = MODES[self.session.tap_mode](self, started)
            for event, size in self._events(self.session.session_id):
                if isinstance(event, StartEvent):
                    mode.start(event)
                elif isinstance(event, DoneEvent):
                    self.status, self.error = event.status, event.reason
                    self.accounts.steps = event.steps
                    if event.run_ahead is not None:
                        self.accounts.withdrawn = event.run_ahead.withdrawn
                elif (token := mode.on(event, size)) is not None:
                    self.tokens.append(token)
                    self.accounts.add(token)
                    self.accounts.wall_s = time.perf_counter() - started
                    yield token
                    mode.after_shown()
            if self.status == "running":
                raise CloudUnreachable("the cloud ended the event stream without a `done` event")
        except CloudUnreachable as exc:
            self.status, self.error = (
                "failed",
                (f"the connection to the cloud broke after {len(self.tokens)} tokens: {exc}"),
            )
            raise CloudUnreachable(self.error) from None
        except BaseException as exc:  # an error or an interrupt: stop the cloud's work too
            self.status = "failed" if isinstance(exc, Exception) else "cancelled"
            self.error = self.error or str(exc)
            if self.session is not None:
                self.client.cancel(self.session.session_id)
            raise
        finally:
            self.accounts.wall_s = time.perf_counter() - started
            if self.on_end is not None:
                self.on_end(self)
        if self.status == "failed":
            raise DeviceError(f"the cloud could not finish the generation: {self.error}")

    def _events(self, sid: str) -> Iterator[tuple[Event, int]]:
        """The session's events; a stream that breaks is resumed after the last event read (the
        cloud replays the rest), up to the client's attempts in a row, with its backoff."""
        read, failures = 0, 0
        while True:
            try:
                for item in self.client.events(sid, after=read if read or failures else None):
                    read, failures = read + 1, 0
                    yield item
                return
            except CloudUnreachable:
                failures += 1
                if failures >= self.client.config.attempts:
                    raise
                self.accounts.resumes += 1
                time.sleep(self.client.config.backoff_s * 2 ** (failures - 1))


def _b64(x: torch.Tensor) -> str:
    return wire.b64encode(wire.encode(x, "float32"))


def _reason(error: dict) -> str:
    """One pydantic error as `field: message` (a whole-model check has no field)."""
    where, message = ".".join(map(str, error["loc"])), error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
