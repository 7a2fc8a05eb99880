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

from torch import Tensor

from cloud_api.db import LIVE, Records, now
from cloud_api.errors import ApiError
from cloud_api.event_log import END, EventLog
from cloud_api.ledger import Ledger, StepCost
from cloud_api.side_requests import SideRequest, SideRequests
from personalization.config import DecodeConfig, TapMode
from personalization.decoding import generate
from personalization.latency import Books, round_trips_per_step
from personalization.model import Ask, SPAModel
from protocol import wire
from protocol.events import DoneEvent, Event, SideRequestEvent, StartEvent, TapsEvent, TokenEvent
from protocol.messages import RunAheadTotals, SessionFacts, SessionTotals

log = logging.getLogger("cloud_api.sessions")


class Session:
    """One device's generation (see the module docstring for the life cycle): the decoding
    thread, with its event stream (`EventLog`), its asks for g(x) (`SideRequests`) and its books
    (`ledger`: the totals, and the token being made)."""

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
        self.resume_s = resume_s
        self.tap_dtype = model.config.wire_dtype
        self.hidden_size = model.backbone.hidden_size
        self.records, self.on_end = records, on_end
        self.status = "created"
        self.ledger = Ledger()  # what it cost so far (recorded when it ends), and this token
        self.books = Books()  # the decoding's own books (its steps give M)
        self.run_ahead: RunAheadTotals | None = None  # what run-ahead did (its subclass)
        self.last_active = time.monotonic()
        self.events = EventLog(session_id, on_loop_gone=self._server_gone)
        self.requests = SideRequests(session_id, deadline_s, self.tap_dtype, self.hidden_size)
        self._lock = threading.Lock()
        self._stop: tuple[str, str] | None = None  # (status, reason) asked for by cancel / TTL
        self._thread: threading.Thread | None = None

    @property
    def totals(self) -> SessionTotals:
        """What it cost so far, in the protocol's names (a snapshot)."""
        return self.ledger.books.totals()

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
            opened = self.events.attach(loop, after, ended=self.status not in LIVE)
            start = self.status == "created"
            if start:
                self.status = "running"
                self._thread = threading.Thread(
                    target=self._run, name=f"session-{self.id}", daemon=True
                )
        if start:
            self._thread.start()
        return opened

    def answer(self, request_id: int, data: bytes, dtype: str) -> None:
        """Accept the device's g(x) for a side request (raw bytes in `dtype`), or refuse it."""
        if self.status not in LIVE:
            raise ApiError(409, f"session {self.id} is {self.status}; it takes no answers")
        self.requests.answer(request_id, data, dtype, self._received)

    def _received(self, size: int) -> None:
        self.ledger.received(size)
        self.last_active = time.monotonic()

    def cancel(self, status: str = "cancelled", reason: str = "cancelled by the device") -> bool:
        """Stop the session (False if it had already ended); a waiting side request is dropped."""
        with self._lock:
            if self.status not in LIVE or self._stop is not None:
                return False
            self._stop = (status, reason)
            running = self._thread is not None
        self.requests.cancel_waiting()
        self.events.attached.set()  # a paused session wakes up to end
        if not running:  # never streamed: nothing else will end it
            self._end(status, reason)
        return True

    def idle_s(self) -> float:
        return time.monotonic() - self.last_active

    def _server_gone(self) -> None:
        self._stop = self._stop or ("cancelled", "server shutting down")

    # ---- the decoding thread -------------------------------------------------------------------
    def _run(self) -> None:
        """The life cycle every kind of session shares around its `_decode`: recorded as
        running, a bug ends the session cleanly (not the server), a cancel wins, `done` last."""
        started = time.perf_counter()
        status, reason = "finished", ""
        try:
            self.records.update_session(self.id, status="running")
            reason = self._decode() or ""
        except Exception as exc:
            log.exception("session %s failed", self.id)
            status, reason = "failed", f"{type(exc).__name__}: {exc}"[:200]
        if self._stop:
            status, reason = self._stop
        self.ledger.books.wall_s = time.perf_counter() - started
        self._end(status, reason)

    def _decode(self) -> str | None:
        """Decode, emitting each token (each kind of session its own way); returns a remark
        for `done` (None: nothing to say)."""
        raise NotImplementedError

    def _await(self, request: SideRequest) -> bool:
        """Wait up to the deadline for the device's answer (this session queues no pass
        meanwhile); a request that expires counts as a fallback."""
        state, seconds = self.requests.wait(request)
        self.ledger.waited(seconds, expired=state == "expired")
        return state == "answered"

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

    def _end(self, status: str, reason: str) -> None:
        """Record the outcome, leave the registry, then close the stream (once): a device that
        has read `done` finds the record final and the session's slot free."""
        with self._lock:
            if self.status not in LIVE:
                return
            self.status = status
        totals = self.totals
        try:
            self.records.update_session(
                self.id, status=status, reason=reason[:200], finished_at=now(), **dict(totals)
            )
        except Exception:  # the database must not take the stream down with it
            log.exception("could not record session %s", self.id)
        self.on_end(self)
        m = round_trips_per_step(totals.device_contacts, self.books.steps)
        done = DoneEvent(
            status=status,
            reason=reason,
            steps=self.books.steps,
            M=m,
            totals=totals,
            run_ahead=self.run_ahead,
        )
        self._emit(done)
        self.events.put(END)

    def _emit(self, event: Event) -> int:
        """Queue one NDJSON line for the device; returns its size in bytes."""
        line = event.to_line()
        self.events.put(line)
        self.last_active = time.monotonic()
        return len(line)


class GenerationSession(Session):
    """Decoding with `personalization.decoding.generate`: the tokens of in-process decoding, the
    device asked (a side request) where σ = 1, taps pulled with each ask or streamed as they
    exist."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.streamed = self.tap_mode == "streamed"
        self._acked = 0  # tap positions the device has confirmed by answering
        self._pushed = 0  # streamed mode: tap positions sent so far

    def _decode(self) -> None:
        stream = self._push if self.streamed else None
        generation = generate(
            self.model, self.prompt_ids, self.decode, device=self._ask, stream=stream
        )
        books, tokens = generation.books, iter(generation)
        self.books = books
        self._emit(StartEvent(**dict(self.facts())))
        for index in range(self.decode.max_new_tokens):
            self.events.attached.wait()  # paused while the device is away (cancel wakes it)
            if self._stop:
                return None
            self.ledger.next_token()
            cloud_before = books.t_cloud
            token = next(tokens, None)
            if token is None:  # a token already computed is still emitted; a cancel
                return None  # stops the session at the next token boundary (checked above)
            step = self.ledger.token(token.branch, books.t_cloud - cloud_before)
            self._emit(token_event(index, token, step, self.strict))
        return None

    def _ask(self, ask: Ask) -> Tensor | None:
        """The `Device` of this session: publish a side request, wait for g(x) or the deadline.
        Beam search sends its B rows (the shared prompt once) and how rows were reordered."""
        rows, positions = ask.taps.shape[:2]
        start = self._pushed if self.streamed else self._acked  # streamed: nothing pending
        request = self.requests.open(start, positions, rows)
        if self._stop:  # after opening: a cancel either saw this request or is seen here
            return None
        sent = self._emit(
            SideRequestEvent(
                request_id=request.id,
                at=self._pushed - 1 if self.streamed else request.start + positions - 1,
                reorder=None if ask.reorder is None else ask.reorder.tolist(),
                deadline_s=self.deadline_s,
                **tap_fields(self.model.codec, self.tap_dtype, request.start, ask.taps, ask.shared),
            )
        )
        self.ledger.asked(request.id, ask.shared + rows * (positions - ask.shared))
        self.ledger.sent(sent)
        if not self._await(request):
            return None
        self._acked = request.start + positions
        return request.g

    def _push(self, taps: Tensor) -> None:
        """Streamed mode: new positions' taps go to the device as soon as they exist."""
        fields = tap_fields(self.model.codec, self.tap_dtype, self._pushed, taps, 0)
        self.ledger.sent(self._emit(TapsEvent(**fields)))
        self._pushed += taps.shape[1]
        self.ledger.books.tap_positions += taps.shape[1]


def tap_fields(codec, dtype: str, start: int, taps: Tensor, shared: int) -> dict:
    """The fields of an event that carries taps [rows, t, R, H] in the session's encoding."""
    rows, positions, rungs, hidden = taps.shape
    return {
        "start": start,
        "positions": positions,
        "shape": [positions, rungs, hidden],
        "rows": rows,
        "shared": shared,
        "dtype": dtype,
        "encoding": codec.name,
        "taps": wire.b64encode(wire.encode_taps(taps, shared, codec)),
    }


def token_event(index: int, token, step: StepCost, strict: bool) -> TokenEvent:
    """A token with its share of the bill (strict: the gate's p stays on the device)."""
    return TokenEvent(
        index=index,
        id=token.id,
        text=token.text,
        branch=token.branch,
        gate_prob=None if strict else token.gate_prob,
        request_id=step.request_id,
        cloud_ms=round(1e3 * step.cloud_s, 3),
        device_wait_ms=round(1e3 * step.device_wait_s, 3),
        bytes_to_device=step.bytes_to_device,
        bytes_from_device=step.bytes_from_device,
    )


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
        gone = [s for s in live if s.events.detached_s() > self.resume_s and s not in idle]
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
