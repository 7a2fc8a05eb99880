"""Generation sessions: the cloud half of docs/protocol.md, one state machine per session.

    created ──(device opens the event stream)──▶ running ──▶ finished | cancelled | expired | failed
       └──────────────(cancel, idle past the TTL)──────────▶ cancelled | expired

A running session decodes in its own thread with `personalization.decoding.generate`, so the
tokens are exactly those of in-process decoding; only the device differs: `Session._ask` (the
`Device` the stepper calls when σ = 1) publishes a `side_request` event with the pending taps and
waits for the device's g(x) up to the deadline. A missed deadline returns None: the stepper emits
f's own token as `fallback` and keeps the taps pending, so the next side request again starts at
the first position the device has not confirmed (`start`); a device that computed a late answer
crops its side-network cache back to `start`.

Every event line is kept in the session's log, so a device whose connection drops resumes it:
`GET …/events?after=N` (N = the lines it has read) replays the rest and goes on live. While no
stream is attached the session pauses at the next token boundary (a side request still waits for
its deadline); one left alone for `resume_s` is cancelled by the sweep, and an ended session's
log stays resumable for `resume_s` too, so a device that missed `done` still reads it.

The session's backbone passes go through the step scheduler (`cloud_api.scheduler`): sessions
that are ready share one batched pass per decoding step, and a session waiting for its device
queues nothing, so a slow device never holds up anyone else; the event loop never computes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from cloud_api.db import LIVE, Records, now
from cloud_api.errors import ApiError
from personalization.config import DecodeConfig, TapMode
from personalization.decoding import generate
from personalization.latency import Books, round_trips_per_step
from personalization.model import Ask, SPAModel
from protocol import wire
from protocol.events import (
    DoneEvent,
    SideRequestEvent,
    StartEvent,
    TapsEvent,
    TokenEvent,
)
from protocol.messages import RunAheadTotals, SessionFacts, SessionTotals

log = logging.getLogger("cloud_api.sessions")

END = None  # queue sentinel: the stream is over


class SideRequest:
    """One ask for g(x): waiting → answered | expired | cancelled (under the session's lock)."""

    def __init__(self, request_id: int, start: int, positions: int, rows: int = 1):
        self.id, self.start, self.positions, self.rows = request_id, start, positions, rows
        self.state = "waiting"
        self.g: Tensor | None = None
        self.done = threading.Event()


class Session:
    """One device's generation (see the module docstring for the life cycle)."""

    def __init__(
        self,
        *,
        session_id: str,
        device_id: str,
        model: SPAModel,
        prompt_ids: list[int],
        decode: DecodeConfig,
        deadline_s: float,
        strict: bool,
        tap_mode: TapMode = "pull",
        resume_s: float = 30.0,
        records: Records,
        on_end: Callable[[Session], None],
    ):
        self.id, self.device_id = session_id, device_id
        self.model, self.prompt_ids, self.decode = model, prompt_ids, decode
        self.deadline_s, self.strict, self.tap_mode = deadline_s, strict, tap_mode
        self.streamed = tap_mode == "streamed"
        self.resume_s = resume_s
        self.tap_dtype = model.config.wire_dtype
        self.hidden_size = model.backbone.hidden_size
        self.records, self.on_end = records, on_end
        self.status = "created"
        self.totals = SessionTotals()  # what it cost so far (recorded when it ends)
        self.books = Books()  # the decoding's own books (its steps give M)
        self.run_ahead: RunAheadTotals | None = None  # what run-ahead did (its subclass)
        self.last_active = time.monotonic()
        self._lock = threading.Lock()
        self._requests: dict[int, SideRequest] = {}
        self._acked = 0  # tap positions the device has confirmed by answering
        self._pushed = 0  # streamed mode: tap positions sent so far
        self._stop: tuple[str, str] | None = None  # (status, reason) asked for by cancel / TTL
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._log: list[bytes] = []  # every event line sent: what a resumed stream replays
        self._streams = 0  # event streams opened (the attached one is number `_streams`)
        self._attached = threading.Event()  # a device is reading the events
        self._detached_at: float | None = None
        self._thread: threading.Thread | None = None
        self._step = _StepCost()

    # ---- called from the API ---------------------------------------------------------------
    def open_stream(
        self, loop: asyncio.AbstractEventLoop, after: int | None = None
    ) -> tuple[int, asyncio.Queue]:
        """Attach an event stream: (its number, the queue its NDJSON lines go to, then END).
        The first starts generating; `after` = N resumes a broken one, replaying every line
        after the first N (called on the event loop's thread)."""
        with self._lock:
            if after is None and self.status != "created":
                raise ApiError(
                    409,
                    f"session {self.id} is {self.status}: its events stream once; a device "
                    "whose stream broke resumes it with ?after=<event lines read>",
                )
            if after is not None and after > len(self._log):
                raise ApiError(
                    422, f"after={after}, but session {self.id} has sent {len(self._log)} events"
                )
            old, self._loop, self._queue = self._queue, loop, asyncio.Queue()
            for line in self._log[after or 0 :]:
                self._queue.put_nowait(line)
            if self.status not in LIVE:
                self._queue.put_nowait(END)
            if old is not None:  # a stream the server has not yet seen break ends here
                old.put_nowait(END)
            self._streams += 1
            self._detached_at = None
            self._attached.set()
            start = self.status == "created"
            if start:
                self.status = "running"
                self._thread = threading.Thread(
                    target=self._run, name=f"session-{self.id}", daemon=True
                )
        if start:
            self._thread.start()
        return self._streams, self._queue

    def detach(self, stream: int) -> None:
        """Event stream `stream` closed: pause (at the next token) until the device resumes."""
        with self._lock:
            if stream == self._streams and self.status in LIVE:
                self._attached.clear()
                self._detached_at = time.monotonic()

    def detached_s(self) -> float:
        """How long no device has read this session's events (0 while one does)."""
        at = self._detached_at
        return 0.0 if at is None else time.monotonic() - at

    def answer(self, request_id: int, data: bytes, dtype: str) -> None:
        """Accept the device's g(x) for a side request (raw bytes in `dtype`), or refuse it."""
        with self._lock:
            if self.status not in LIVE:
                raise ApiError(409, f"session {self.id} is {self.status}; it takes no answers")
            request = self._requests.get(request_id)
            if request is None:
                raise ApiError(
                    404, f"side request {request_id} was never made in session {self.id}"
                )
            if request.state == "answered":
                raise ApiError(409, f"side request {request_id} was already answered")
            if request.state == "expired":
                raise ApiError(
                    409,
                    f"side request {request_id} expired: its deadline ({self.deadline_s:g} s) "
                    f"passed and the token fell back to the backbone; the next side request "
                    f"re-sends the taps from position {request.start}",
                )
            if request.state != "waiting":
                raise ApiError(409, f"side request {request_id} was {request.state}")
            if dtype != self.tap_dtype:
                raise ApiError(
                    422, f"g must be {self.tap_dtype} (the session's tap dtype), got {dtype}"
                )
            try:
                g = wire.decode(data, dtype, (request.rows, self.hidden_size), what="g(x)")
            except wire.WireError as exc:
                raise ApiError(422, str(exc)) from None
            request.state, request.g = "answered", g
            self.totals.bytes_from_device += len(data)
            self._step.bytes_from_device += len(data)
            self.last_active = time.monotonic()
            request.done.set()

    def cancel(self, status: str = "cancelled", reason: str = "cancelled by the device") -> bool:
        """Stop the session (False if it had already ended); a waiting side request is dropped."""
        with self._lock:
            if self.status not in LIVE or self._stop is not None:
                return False
            self._stop = (status, reason)
            for request in self._requests.values():
                if request.state == "waiting":
                    request.state = "cancelled"
                    request.done.set()
            self._attached.set()  # a paused session wakes up to end
            running = self._thread is not None
        if not running:  # never streamed: nothing else will end it
            self._end(status, reason)
        return True

    def idle_s(self) -> float:
        return time.monotonic() - self.last_active

    # ---- the decoding thread -------------------------------------------------------------------
    def _run(self) -> None:
        started = time.perf_counter()
        status, reason = "finished", ""
        try:
            self.records.update_session(self.id, status="running")
            stream = self._push if self.streamed else None
            generation = generate(
                self.model, self.prompt_ids, self.decode, device=self._ask, stream=stream
            )
            books, tokens = generation.books, iter(generation)
            self.books = books
            self._emit(StartEvent(**dict(self.facts())))
            for index in range(self.decode.max_new_tokens):
                self._attached.wait()  # paused while the device is away (cancel wakes it)
                if self._stop:
                    break
                self._step = _StepCost()
                cloud_before = books.t_cloud
                token = next(tokens, None)
                if token is None:  # a token already computed is still emitted; a cancel
                    break  # stops the session at the next token boundary (checked above)
                step = self._step
                step.cloud_s = books.t_cloud - cloud_before
                self._account(token.branch, step)
                self._emit(self._token_event(index, token, step))
        except Exception as exc:  # a bug must end this session cleanly, not the server
            log.exception("session %s failed", self.id)
            status, reason = "failed", f"{type(exc).__name__}: {exc}"[:200]
        if self._stop:
            status, reason = self._stop
        self.totals.wall_s = time.perf_counter() - started
        self._end(status, reason)

    def _ask(self, ask: Ask) -> Tensor | None:
        """The `Device` of this session: publish a side request, wait for g(x) or the deadline.
        Beam search sends its B rows (the shared prompt once) and how rows were reordered."""
        rows, positions = ask.taps.shape[:2]
        with self._lock:
            if self._stop:
                return None
            start = self._pushed if self.streamed else self._acked  # streamed: nothing pending
            request = SideRequest(len(self._requests) + 1, start, positions, rows)
            self._requests[request.id] = request
        sent = self._emit(
            SideRequestEvent(
                request_id=request.id,
                at=self._pushed - 1 if self.streamed else request.start + positions - 1,
                reorder=None if ask.reorder is None else ask.reorder.tolist(),
                deadline_s=self.deadline_s,
                **self._taps(request.start, ask.taps, ask.shared),
            )
        )
        self.totals.device_contacts += 1
        self.totals.tap_positions += ask.shared + rows * (positions - ask.shared)
        self.totals.bytes_to_device += sent
        self._step.bytes_to_device += sent
        self._step.request_id = request.id
        if not self._await(request):
            return None
        with self._lock:
            self._acked = request.start + positions
        return request.g

    def _await(self, request: SideRequest) -> bool:
        """Wait up to the deadline for the device's answer (this session queues no pass
        meanwhile); a request still waiting then expires, and counts as a fallback."""
        waited = time.perf_counter()
        request.done.wait(self.deadline_s)
        wait_s = time.perf_counter() - waited
        self.totals.device_wait_s += wait_s
        self._step.device_wait_s += wait_s
        with self._lock:
            if request.state == "waiting":
                request.state = "expired"
            if request.state != "answered":
                self.totals.fallbacks += request.state == "expired"
                return False
        return True

    def _push(self, taps: Tensor) -> None:
        """Streamed mode: new positions' taps go to the device as soon as they exist."""
        sent = self._emit(TapsEvent(**self._taps(self._pushed, taps, 0)))
        self._pushed += taps.shape[1]
        self.totals.tap_positions += taps.shape[1]
        self.totals.bytes_to_device += sent
        self._step.bytes_to_device += sent

    def _taps(self, start: int, taps: Tensor, shared: int) -> dict:
        """The fields of an event that carries taps [rows, t, R, H] in the session's encoding."""
        rows, positions, rungs, hidden = taps.shape
        codec = self.model.codec
        return {
            "start": start,
            "positions": positions,
            "shape": [positions, rungs, hidden],
            "rows": rows,
            "shared": shared,
            "dtype": self.tap_dtype,
            "encoding": codec.name,
            "taps": wire.b64encode(wire.encode_taps(taps, shared, codec)),
        }

    def _account(self, branch: str, step: _StepCost) -> None:
        self.totals.tokens += 1
        self.totals.device_tokens += branch == "device"
        self.totals.cloud_s += step.cloud_s

    def facts(self) -> SessionFacts:
        return SessionFacts(
            session_id=self.id,
            prompt_tokens=len(self.prompt_ids),
            setting=self.model.setting,
            strict=self.strict,
            rungs=list(self.model.rungs),
            hidden_size=self.hidden_size,
            tap_dtype=self.tap_dtype,
            tap_encoding=self.model.config.tap_encoding,
            tap_mode=self.tap_mode,
            deadline_s=self.deadline_s,
        )

    def _token_event(self, index: int, token, step: _StepCost) -> TokenEvent:
        return TokenEvent(
            index=index,
            id=token.id,
            text=token.text,
            branch=token.branch,
            gate_prob=None if self.strict else token.gate_prob,
            request_id=step.request_id,
            cloud_ms=round(1e3 * step.cloud_s, 3),
            device_wait_ms=round(1e3 * step.device_wait_s, 3),
            bytes_to_device=step.bytes_to_device,
            bytes_from_device=step.bytes_from_device,
        )

    def _end(self, status: str, reason: str) -> None:
        """Record the outcome, leave the registry, then close the stream (once): a device that
        has read `done` finds the record final and the session's slot free."""
        with self._lock:
            if self.status not in LIVE:
                return
            self.status = status
        totals = self.totals.model_copy()
        try:
            self.records.update_session(
                self.id, status=status, reason=reason[:200], finished_at=now(), **dict(totals)
            )
        except Exception:  # the database must not take the stream down with it
            log.exception("could not record session %s", self.id)
        self.on_end(self)
        steps = self.books.steps
        m = round_trips_per_step(totals.device_contacts, steps)
        self._emit(
            DoneEvent(
                status=status,
                reason=reason,
                steps=steps,
                M=m,
                totals=totals,
                run_ahead=self.run_ahead,
            )
        )
        self._put(END)

    # ---- events ----------------------------------------------------------------------------------
    def _emit(
        self, event: StartEvent | TapsEvent | SideRequestEvent | TokenEvent | DoneEvent
    ) -> int:
        """Queue one NDJSON line for the device; returns its size in bytes."""
        line = event.to_line()
        self._put(line)
        self.last_active = time.monotonic()
        return len(line)

    def _put(self, item: bytes | None) -> None:
        with self._lock:  # logged and queued in one step: a resume replays exactly the rest
            if item is not END:
                self._log.append(item)
            loop, queue = self._loop, self._queue
        if loop is None or queue is None:
            return
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: the server is shutting down
            self._stop = self._stop or ("cancelled", "server shutting down")


@dataclass
class _StepCost:
    """What producing one token cost (the token event's timings and bytes)."""

    cloud_s: float = 0.0
    device_wait_s: float = 0.0
    bytes_to_device: int = 0
    bytes_from_device: int = 0
    request_id: int | None = None


class Registry:
    """The live sessions of this process: the concurrency cap and the sweep; ended sessions
    stay resumable (their event log) for `resume_s`."""

    def __init__(self, max_sessions: int, ttl_s: float, resume_s: float = 30.0):
        self.max_sessions, self.ttl_s, self.resume_s = max_sessions, ttl_s, resume_s
        self._sessions: dict[str, Session] = {}
        self._ended: dict[str, tuple[float, Session]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, session: Session) -> None:
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise ApiError(
                    429,
                    f"{len(self._sessions)} sessions are open, the limit is {self.max_sessions} "
                    "(SPA_CLOUD_MAX_SESSIONS); retry when one ends",
                    headers={"Retry-After": "1"},
                )
            self._sessions[session.id] = session

    def get(self, session_id: str, *, ended: bool = False) -> Session | None:
        """A live session; with `ended`, also one that ended less than `resume_s` ago."""
        session = self._sessions.get(session_id)
        if session is None and ended:
            session = self._ended.get(session_id, (0.0, None))[1]
        return session

    def remove(self, session: Session) -> None:
        with self._lock:
            self._sessions.pop(session.id, None)
            self._ended[session.id] = (time.monotonic(), session)
            self._forget()

    def _forget(self) -> None:
        oldest = time.monotonic() - self.resume_s
        for sid in [sid for sid, (at, _) in self._ended.items() if at < oldest]:
            del self._ended[sid]

    def sweep(self) -> int:
        """Expire sessions idle for longer than the TTL and cancel those whose device left
        without resuming; returns how many ended."""
        live = list(self._sessions.values())
        idle = [s for s in live if s.idle_s() > self.ttl_s]
        gone = [s for s in live if s.detached_s() > self.resume_s and s not in idle]
        reason = f"idle for more than {self.ttl_s:g} s (SPA_CLOUD_SESSION_TTL_S)"
        left = (
            f"the device closed its event stream and did not resume it within "
            f"{self.resume_s:g} s (SPA_CLOUD_RESUME_S)"
        )
        ended = sum(s.cancel("expired", reason) for s in idle)
        ended += sum(s.cancel("cancelled", left) for s in gone)
        with self._lock:
            self._forget()
        return ended

    def cancel_all(self, reason: str) -> None:
        for session in list(self._sessions.values()):
            session.cancel("cancelled", reason)
