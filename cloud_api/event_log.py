"""A session's event stream: every NDJSON line kept, the attached stream fed, a broken one resumed.

Every line sent is logged, so a device whose connection drops resumes with `?after=N` (the lines
it has read): the rest is replayed and the stream goes on live. Logging a line and queueing it
happen in one step under the log's lock, so a resume replays exactly the lines the broken stream
missed. While no stream is attached `attached` is clear: the session pauses at its next token.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from cloud_api.errors import ApiError

END = None  # queue sentinel: the stream is over


class EventLog:
    """The lines of one session and the stream (asyncio queue) that reads them now."""

    def __init__(self, session_id: str, on_loop_gone: Callable[[], None]):
        self.session_id = session_id
        self._lock = threading.Lock()
        self._lines: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._detached_at: float | None = None
        self._on_loop_gone = on_loop_gone  # the event loop is gone: the server is stopping
        self.streams = 0  # streams opened; the attached one is number `streams`
        self.attached = threading.Event()  # a device is reading the events

    def __len__(self) -> int:
        return len(self._lines)

    def attach(
        self, loop: asyncio.AbstractEventLoop, after: int | None, ended: bool
    ) -> tuple[int, asyncio.Queue]:
        """A new stream: the lines after the first `after` replayed into it (then END if the
        session has `ended`); a stream still attached ends here."""
        after = after or 0
        if after > len(self._lines):
            raise ApiError(
                422, f"after={after}, but the session has sent {len(self._lines)} events"
            )
        with self._lock:
            old, self._loop, self._queue = self._queue, loop, asyncio.Queue()
            for line in self._lines[after:]:
                self._queue.put_nowait(line)
            if ended:
                self._queue.put_nowait(END)
            if old is not None:  # a stream the server has not yet seen break ends here
                old.put_nowait(END)
            self.streams += 1
            self._detached_at = None
            self.attached.set()
            return self.streams, self._queue

    def detach(self, stream: int) -> None:
        """Stream `stream` closed: no device reads the events until one resumes."""
        with self._lock:
            if stream == self.streams:
                self.attached.clear()
                self._detached_at = time.monotonic()

    def detached_s(self) -> float:
        """How long no device has read the events (0 while one does)."""
        at = self._detached_at
        return 0.0 if at is None else time.monotonic() - at

    def put(self, item: bytes | None) -> None:
        """Log a line (END is not logged) and queue it to the attached stream, if any."""
        with self._lock:
            if item is not END:
                self._lines.append(item)
            loop, queue = self._loop, self._queue
        if loop is None or queue is None:
            return
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:
            self._on_loop_gone()
