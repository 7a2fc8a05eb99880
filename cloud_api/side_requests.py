"""A session's asks for g(x): each side request waiting → answered | expired | cancelled.

The decoding thread opens a request and waits for the device's answer up to the deadline; a
request still waiting then expires and its token falls back to the backbone's own. The API thread
hands in answers, checked against the session's dtype and hidden size; every state change
happens under one lock, so an answer and an expiry never both win.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from torch import Tensor

from cloud_api.errors import ApiError
from protocol import wire


class SideRequest:
    """One ask for g(x) over `positions` taps from `start`, for `rows` beams."""

    def __init__(self, request_id: int, start: int, positions: int, rows: int = 1):
        self.id, self.start, self.positions, self.rows = request_id, start, positions, rows
        self.state = "waiting"
        self.g: Tensor | None = None
        self.done = threading.Event()


class SideRequests:
    """The side requests of one session, numbered from 1."""

    def __init__(self, session_id: str, deadline_s: float, dtype: str, hidden_size: int):
        self.session_id, self.deadline_s = session_id, deadline_s
        self.dtype, self.hidden_size = dtype, hidden_size
        self._lock = threading.Lock()
        self._all: dict[int, SideRequest] = {}

    def __len__(self) -> int:
        return len(self._all)

    def open(self, start: int, positions: int, rows: int = 1) -> SideRequest:
        with self._lock:
            request = SideRequest(len(self._all) + 1, start, positions, rows)
            self._all[request.id] = request
        return request

    def answer(
        self, request_id: int, data: bytes, dtype: str, accepted: Callable[[int], None]
    ) -> None:
        """The device's g(x) for a request (raw bytes in `dtype`), or a 4xx saying why not;
        `accepted` (its size) runs before the waiting thread wakes, so it is in that token's
        books."""
        with self._lock:
            request = self._all.get(request_id)
            if request is None:
                raise ApiError(
                    404, f"side request {request_id} was never made in session {self.session_id}"
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
            if dtype != self.dtype:
                raise ApiError(
                    422, f"g must be {self.dtype} (the session's tap dtype), got {dtype}"
                )
            try:
                g = wire.decode(data, dtype, (request.rows, self.hidden_size), what="g(x)")
            except wire.WireError as exc:
                raise ApiError(422, str(exc)) from None
            request.state, request.g = "answered", g
            accepted(len(data))
            request.done.set()

    def wait(self, request: SideRequest) -> tuple[str, float]:
        """Wait up to the deadline for the answer: (the request's final state, seconds waited);
        one still waiting then expires."""
        waited = time.perf_counter()
        request.done.wait(self.deadline_s)
        seconds = time.perf_counter() - waited
        with self._lock:
            if request.state == "waiting":
                request.state = "expired"
            return request.state, seconds

    def cancel_waiting(self) -> None:
        """The session stops: a request still waiting is dropped (its waiter wakes up)."""
        with self._lock:
            for request in self._all.values():
                if request.state == "waiting":
                    request.state = "cancelled"
                    request.done.set()
