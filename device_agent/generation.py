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
from dataclasses import asdict, dataclass, field

import torch
from pydantic import ValidationError

from device_agent.client import CloudClient
from device_agent.errors import CloudUnreachable, DeviceError
from personalization.config import GATED_SETTINGS, DecodeConfig, TapMode
from personalization.latency import round_trips_per_step
from personalization.model import SPAModel
from personalization.run_ahead import verdict
from protocol import wire
from protocol.events import (
    CorrectedEvent,
    DoneEvent,
    DraftEvent,
    Event,
    SideRequestEvent,
    StartEvent,
    TapsEvent,
    TokenEvent,
)
from protocol.messages import DecodingIn, GateIn, SessionIn, SessionOut, VerdictIn


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
    bytes_down: int = 0
    bytes_up: int = 0
    contacts: int = 0

    @property
    def total_s(self) -> float:
        return self.cloud_s + self.device_s + self.net_s


@dataclass
class Accounts:
    """Running totals of a generation; `T_total` is exactly the sum of its parts."""

    tokens: int = 0
    steps: int = 0  # decoding steps: one per streamed token, the cloud's count once it is done
    device_tokens: int = 0
    fallbacks: int = 0
    contacts: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    t_cloud: float = 0.0
    t_device: float = 0.0
    t_net: float = 0.0
    wall_s: float = 0.0  # stream opened → last event, measured on the device
    positions: int = 0  # tap positions received
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
        self.bytes_down += token.bytes_down
        self.bytes_up += token.bytes_up
        self.t_cloud += token.cloud_s
        self.t_device += token.device_s
        self.t_net += token.net_s

    @property
    def m(self) -> float:
        return round_trips_per_step(self.contacts, self.steps)

    @property
    def t_total(self) -> float:
        return self.t_cloud + self.t_device + self.t_net

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def summary(self) -> dict:
        return asdict(self) | {
            "M": self.m,
            "t_total": self.t_total,
            "tokens_per_s": self.tokens_per_s,
        }


@dataclass
class _Pending:
    """Side requests answered since the last token event."""

    device_s: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0
    contacts: int = 0
    gate_prob: float | None = None  # strict mode: the device's own gate decided
    sigma: bool = True


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
        cache = self.model.side.new_cache() if self.model is not None else None
        self._before = ([], -1)  # the side cache before the last side request (late answers)
        self._ready = None  # streamed taps: (position, g, its taps) of the newest position
        pending = _Pending()
        started = self._shown = time.perf_counter()
        self._epoch: int | None = 0  # run-ahead: drafts of this epoch count (None: correcting)
        self._late = False  # run-ahead: the cloud ended before our correction; drafts stand
        self._ack: VerdictIn | None = None  # run-ahead: "the drafts stand", sent after showing
        self._prompt_ids: list[int] = []  # run-ahead with repetition controls: from `start`
        self._rng = (
            None
            if self.decode.seed is None
            else torch.Generator().manual_seed(self.decode.seed + 1)
        )
        try:
            self.session = self.client.open_session(self.body())
            sid = self.session.session_id
            for event, size in self._events(sid):
                if isinstance(event, TapsEvent):
                    pending.bytes_down += size
                    t = time.perf_counter()
                    self._feed(event, cache)
                    self.accounts.t_device_ahead += time.perf_counter() - t
                elif isinstance(event, SideRequestEvent):
                    pending.bytes_down += size
                    pending.contacts += 1
                    t = time.perf_counter()
                    g = self._side(event, cache, pending)
                    pending.device_s += time.perf_counter() - t
                    pending.bytes_up += self.client.answer(sid, event.request_id, g, event.dtype)
                elif isinstance(event, DraftEvent | CorrectedEvent):
                    pending.bytes_down += size
                    token = self._run_ahead(event, cache, pending)
                    if token is None:
                        continue
                    pending = _Pending()
                    self.tokens.append(token)
                    self.accounts.add(token)
                    self.accounts.wall_s = time.perf_counter() - started
                    yield token
                    if self._ack is not None:  # the last draft stands: say so, once shown
                        sent, _ = self.client.verdict(sid, self._ack)
                        self.accounts.bytes_up += sent
                        self.accounts.contacts += 1
                        self._ack = None
                elif isinstance(event, TokenEvent):
                    token = self._token(event, pending)
                    pending = _Pending()
                    self.tokens.append(token)
                    self.accounts.add(token)
                    self.accounts.wall_s = time.perf_counter() - started
                    yield token
                elif isinstance(event, StartEvent):
                    self._prompt_ids = event.prompt_ids or []
                elif isinstance(event, DoneEvent):
                    self.status, self.error = event.status, event.reason
                    self.accounts.steps = event.steps
                    if event.run_ahead is not None:
                        self.accounts.withdrawn = event.run_ahead.withdrawn
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

    @torch.no_grad()
    def _side(self, event: SideRequestEvent, cache, pending: _Pending) -> torch.Tensor:
        """g(x) [rows, H] for the request's last position; taps from `start` (catch-up
        included; beam search: one row per beam, its shared prompt sent once, and the reorder
        of the beams since our last answer). In strict mode the device's own gate decides, on
        f(x) = the last rung's tap: σ = 0 → 0."""
        if self._ready is not None:  # streamed taps: g was computed as they arrived
            at, g, last = self._ready
            if event.at != at:
                raise DeviceError(f"asked for g at position {event.at}, the taps reached {at}")
            return self._strict(g, last, pending)
        taps = event.decode_taps(self.model.codec)
        start, rows, shared, positions = event.start, event.rows, event.shared, event.positions
        if cache.length > start:  # our last answer came too late: undo what it did to the cache
            kv, at = self._before
            cache.kv = (
                list(kv)
                if at == start
                else [
                    None if e is None else (e[0][:, :, :start], e[1][:, :, :start])
                    for e in cache.kv
                ]
            )
        if cache.length != start:
            raise DeviceError(
                f"side request starts at position {start}, the side network has seen {cache.length}"
            )
        self._before = (list(cache.kv), start)
        if event.reorder is not None:
            cache.reorder(torch.tensor(event.reorder))
        self.accounts.positions += shared + rows * (positions - shared)
        model = self.model
        g = model.side(taps.to(model.side_dtype), cache)[:, -1]
        return self._strict(g, taps[:, -1], pending)

    @torch.no_grad()
    def _feed(self, event: TapsEvent, cache) -> None:
        """Streamed taps: run the side network over them as they arrive (off the critical
        path), so that a side request finds g of the newest position ready."""
        if cache.length != event.start:
            raise DeviceError(
                f"taps start at position {event.start}, the side network has seen {cache.length}"
            )
        taps = event.decode_taps(self.model.codec)
        g = self.model.side(taps.to(self.model.side_dtype), cache)[:, -1]
        self._ready = (event.start + event.positions - 1, g, taps[:, -1])
        self.accounts.positions += event.positions

    @torch.no_grad()
    def _run_ahead(self, event: DraftEvent | CorrectedEvent, cache, pending: _Pending):
        """Run-ahead: decide a draft with our own gate and side network — accept it (a token to
        show now) or post a correction (shown when the cloud confirms it); drafts of a withdrawn
        epoch are skipped. Returns the token to show, if any."""
        sid = self.session.session_id
        if isinstance(event, CorrectedEvent):
            self._epoch = event.epoch
            return self._shown_token(event, "correction", pending, event.cloud_ms)
        if event.epoch != self._epoch:
            return None  # withdrawn: a correction before it changed what follows
        if self._late:  # the cloud ended before our correction: its drafts stand
            return self._shown_token(event, "fallback", pending, event.cloud_ms)
        model, t = self.model, time.perf_counter()
        if cache.length != event.start:
            raise DeviceError(
                f"draft taps start at position {event.start}, the side network has seen "
                f"{cache.length}"
            )
        g = model.side(event.decode_taps(model.codec).to(model.side_dtype), cache)[0, -1]
        history = self._prompt_ids + [t.id for t in self.tokens[: event.index]]
        token, sigma, p = verdict(
            model, event.decode_f(), g, event.id, self.decode, self._rng, history
        )
        pending.device_s += time.perf_counter() - t
        pending.gate_prob, pending.sigma = p, sigma
        self.accounts.positions += event.positions
        if token != event.id:
            body = VerdictIn(epoch=event.epoch, index=event.index, token=token)
            sent, taken = self.client.verdict(sid, body)
            pending.bytes_up += sent
            pending.contacts += 1
            if taken:
                self._epoch = None  # wait for the cloud's `corrected`
                return None
            self._late = True
            return self._shown_token(event, "fallback", pending, event.cloud_ms)
        if event.last:  # posted once the token is shown (the user need not wait for it)
            self._ack = VerdictIn(epoch=event.epoch, index=event.index)
        return self._shown_token(event, "device" if sigma else "cloud", pending, event.cloud_ms)

    def _shown_token(self, event, branch: str, pending: _Pending, cloud_ms: float) -> TokenCost:
        """A token shown now: the user waited since the previous one; the wait is apportioned
        to the cloud's compute, then the device's, the rest to the network."""
        now = time.perf_counter()
        wait, self._shown = now - self._shown, now
        cloud_s = min(cloud_ms / 1000, wait)
        device_s = min(pending.device_s, wait - cloud_s)
        return TokenCost(
            index=event.index,
            id=event.id,
            text=event.text,
            branch=branch,
            gate_prob=pending.gate_prob,
            cloud_s=cloud_s,
            device_s=device_s,
            net_s=wait - cloud_s - device_s,
            bytes_down=pending.bytes_down,
            bytes_up=pending.bytes_up,
            contacts=pending.contacts,
        )

    def _strict(self, g: torch.Tensor, last: torch.Tensor, pending: _Pending) -> torch.Tensor:
        """In strict mode the device's own gate decides on f(x) = the last rung's tap of the
        position asked (`last` [rows, R, H]): σ = 0 → answer 0 (f's own token)."""
        if not self.strict:
            return g
        model = self.model
        p = float(model.gate_prob(last[0, -1].to(model.side_dtype)))
        pending.gate_prob, pending.sigma = p, p >= model.config.threshold
        return g if pending.sigma else torch.zeros_like(g)

    @staticmethod
    def _token(event: TokenEvent, pending: _Pending) -> TokenCost:
        wait = event.device_wait_ms / 1000
        branch = event.branch
        if branch == "device" and not pending.sigma:
            branch = "cloud"  # strict mode: asked, but the device's gate kept f's token
        return TokenCost(
            index=event.index,
            id=event.id,
            text=event.text,
            branch=branch,
            gate_prob=event.gate_prob if pending.gate_prob is None else pending.gate_prob,
            cloud_s=event.cloud_ms / 1000,
            device_s=pending.device_s,
            net_s=max(0.0, wait - pending.device_s),
            bytes_down=pending.bytes_down,
            bytes_up=pending.bytes_up,
            contacts=pending.contacts,
        )


def _b64(x: torch.Tensor) -> str:
    return wire.b64encode(wire.encode(x, "float32"))


def _reason(error: dict) -> str:
    """One pydantic error as `field: message` (a whole-model check has no field)."""
    where, message = ".".join(map(str, error["loc"])), error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
