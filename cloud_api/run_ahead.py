"""Run-ahead sessions: the backbone drafts without ever waiting; the device corrects.

Each decoding step emits a `draft` event (the new positions' taps in the session's encoding, f(x)
at the drafted position, the drafted token). The device applies its own gate and side network
and posts a verdict only where it disagrees — a correction — and once for the last draft. A
correction rolls the backbone's cache back to the corrected position (the drafts after it are
withdrawn), emits `corrected` and drafting goes on in a new epoch; a stale verdict (an older
epoch, or after the session ended) is refused with a 409 that says so. When the drafts reach
EOS or the token limit the session waits up to its deadline for the device's last verdict; a
device that sends none leaves the backbone's drafts standing, marked unverified in `done`.
See personalization/run_ahead.py for the decision rule.
"""

from __future__ import annotations

import logging
import threading
import time

from cloud_api.errors import ApiError
from cloud_api.sessions import Session, tap_fields
from personalization.decoding import Detokenizer
from personalization.run_ahead import Draft, Drafter
from protocol import wire
from protocol.events import CorrectedEvent, DraftEvent, StartEvent
from protocol.messages import RunAheadTotals

log = logging.getLogger("cloud_api.run_ahead")


class RunAheadSession(Session):
    """A session whose device corrects the backbone's drafts instead of answering side requests."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.epoch = 0
        self.run_ahead = RunAheadTotals()
        self._drafted = -1  # index of the newest draft of the current epoch
        self._correction: tuple[int, int] | None = None  # (index, token) not yet applied
        self._confirmed = -1  # the device said drafts through this index stand (this epoch)
        self._corrected_last = False  # the newest token is the device's own correction
        self._verdict = threading.Event()  # a verdict arrived
        self._detok = Detokenizer(self.model.backbone.tokenizer)

    # ---- called from the API ---------------------------------------------------------------
    def verdict(self, epoch: int, index: int, token: int | None, size: int = 0) -> int:
        """Take the device's verdict on draft `index` of `epoch` (`size`: its body's bytes);
        returns the epoch it applies to. Stale or impossible verdicts are refused (409 / 422)
        and change nothing."""
        with self._lock:
            if self.status not in ("created", "running"):
                raise ApiError(
                    409,
                    f"session {self.id} has ended ({self.status}): the verdict came too late "
                    "and was ignored",
                )
            if epoch != self.epoch or self._correction is not None:
                raise ApiError(
                    409,
                    f"epoch {epoch} is superseded (the session is in epoch {self.epoch}"
                    + (", a correction is pending" if self._correction else "")
                    + "); verdicts on withdrawn drafts are ignored",
                )
            if index > self._drafted:
                raise ApiError(422, f"no draft {index} in epoch {epoch} (drafted {self._drafted})")
            if token is not None and not 0 <= token < self.model.backbone.vocab_size:
                raise ApiError(422, f"token {token} is outside the vocabulary")
            if token is None:
                self._confirmed = max(self._confirmed, index)
            else:
                self._correction = (index, token)
            self.ledger.books.contacts += 1
            self.ledger.books.bytes_from_device += size
            self.last_active = time.monotonic()
            self._verdict.set()
            return epoch

    # ---- the decoding thread -------------------------------------------------------------------
    def _decode(self) -> str | None:
        drafter = Drafter(self.model, self.prompt_ids, self.decode)
        ids = self.prompt_ids if drafter.process else None  # the device's verdicts need them
        self._emit(StartEvent(**dict(self.facts()), prompt_ids=ids))
        try:
            self._loop_drafts(drafter)
        finally:
            self.ledger.books.tokens = len(drafter.tokens)
        if not self.run_ahead.verified:
            return (
                f"the device sent no verdict on the last drafts within {self.deadline_s:g} s: "
                "they stand as the backbone drafted them"
            )
        return None

    def _loop_drafts(self, drafter: Drafter) -> None:
        eos, limit = self.model.backbone.eos_token_ids, self.decode.max_new_tokens
        while True:
            self.events.attached.wait()  # paused while the device is away (cancel wakes it)
            if self._stop:
                return
            self._apply_correction(drafter)
            tokens = drafter.tokens
            if len(tokens) < limit and not (tokens and tokens[-1] in eos):
                self._draft(drafter.step(), drafter)
                continue
            # every draft is out: wait for the device's last verdict (or a correction)
            if self._settled(drafter):
                self.run_ahead.verified = True
                return
            self._verdict.clear()
            if self._settled(drafter) or self._verdict.wait(self.deadline_s):
                continue
            return  # the device is silent: the drafts stand, unverified

    def _settled(self, drafter: Drafter) -> bool:
        """The device has decided every token: it confirmed the last draft, or the last token
        is its own correction."""
        with self._lock:
            if self._correction is not None:
                return False
            last = len(drafter.tokens) - 1
            return self._confirmed >= last or self._corrected_last

    def _draft(self, draft: Draft, drafter: Drafter) -> None:
        eos, limit = self.model.backbone.eos_token_ids, self.decode.max_new_tokens
        text = self._detok.push(draft.token)
        positions = draft.taps.shape[1]
        event = DraftEvent(
            index=draft.index,
            epoch=self.epoch,
            id=draft.token,
            text=text,
            f=wire.b64encode(wire.encode(draft.f, self.tap_dtype)),
            cloud_ms=round(1e3 * draft.cloud_s, 3),
            last=draft.index + 1 >= limit or draft.token in eos,
            **tap_fields(self.model.codec, self.tap_dtype, draft.start, draft.taps, 0),
        )
        with self._lock:
            self._drafted = draft.index
            self._corrected_last = False
        sent = self._emit(event)
        self.books.steps += 1
        self.run_ahead.drafts += 1
        self.ledger.books.tap_positions += positions
        self.ledger.books.bytes_to_device += sent
        self.ledger.books.t_cloud += draft.cloud_s

    def _apply_correction(self, drafter: Drafter) -> None:
        with self._lock:
            correction, self._correction = self._correction, None
        if correction is None:
            return
        index, token = correction
        started = time.perf_counter()
        withdrawn = drafter.correct(index, token)
        self._detok = Detokenizer(self.model.backbone.tokenizer)
        for earlier in drafter.tokens[:index]:
            self._detok.push(earlier)
        text = self._detok.push(token)
        cloud_s = time.perf_counter() - started
        with self._lock:
            self.epoch += 1
            self._drafted, self._confirmed = index, -1
            self._corrected_last = True
        self.run_ahead.corrections += 1
        self.run_ahead.withdrawn += withdrawn
        self.ledger.books.device_tokens += 1
        self.ledger.books.t_cloud += cloud_s
        self._emit(
            CorrectedEvent(
                index=index,
                epoch=self.epoch,
                id=token,
                text=text,
                withdrawn=withdrawn,
                cloud_ms=round(1e3 * cloud_s, 3),
            )
        )

    def cancel(self, status: str = "cancelled", reason: str = "cancelled by the device") -> bool:
        ended = super().cancel(status, reason)
        self._verdict.set()  # a session waiting for its last verdict wakes up to end
        return ended
