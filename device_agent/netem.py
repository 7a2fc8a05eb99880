"""Network emulation as an httpx transport: a named profile's round-trip time and bandwidth.

`EmulatedLink` sits between the device's httpx client and the real transport. Every request pays
half the profile's RTT plus its body's serialisation time on the uplink before it leaves; every
chunk of a response body is
released no earlier than one-way latency after it *arrived* plus its own serialisation time
behind the chunks before it — a delay line, so a streamed response (the session's events) is
delayed like a real link delays it, and a burst of events is not charged the latency once per
event; the end of a body is released one-way latency after it arrived, so an empty body pays it
too. It also counts the bytes in each direction (profile or not).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import httpx

from personalization.latency import NetworkProfile


class EmulatedLink(httpx.BaseTransport):
    """Delays (when `profile` is given) and counts the bytes of every request and response."""

    def __init__(
        self, profile: NetworkProfile | None = None, inner: httpx.BaseTransport | None = None
    ):
        self.profile = profile
        self.inner = inner or httpx.HTTPTransport()
        self.bytes_up = 0
        self.bytes_down = 0
        self._lock = threading.Lock()

    @property
    def one_way_s(self) -> float:
        return self.profile.rtt_s / 2 if self.profile else 0.0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        self._count(up=len(body))
        if self.profile:
            time.sleep(self.one_way_s + 8 * len(body) / self.profile.up_bps)
        response = self.inner.handle_request(request)
        response.stream = _DelayLine(response.stream, self)
        return response

    def close(self) -> None:
        self.inner.close()

    def _count(self, up: int = 0, down: int = 0) -> None:
        with self._lock:
            self.bytes_up += up
            self.bytes_down += down


class _DelayLine(httpx.SyncByteStream):
    """Re-times a response body: chunk i is released at
    max(arrival_i + one way, release_{i-1}) + 8·size_i / bandwidth."""

    _END = object()

    def __init__(self, stream: httpx.SyncByteStream, link: EmulatedLink):
        self.stream, self.link = stream, link
        self._queue: queue.Queue = queue.Queue()
        if link.profile is not None:  # stamp arrivals from now on, not from the first read
            threading.Thread(target=self._read, name="emulated-link", daemon=True).start()

    def _read(self) -> None:
        try:
            for chunk in self.stream:
                self._queue.put((time.monotonic(), chunk))
        except Exception as exc:  # handed to the consumer, raised in its thread
            self._queue.put((time.monotonic(), exc))
        self._queue.put((time.monotonic(), self._END))

    def __iter__(self) -> Iterator[bytes]:
        profile = self.link.profile
        if profile is None:  # nothing to delay: just count, in the caller's thread
            for chunk in self.stream:
                self.link._count(down=len(chunk))
                yield chunk
            return
        released = 0.0
        while True:
            arrived, item = self._queue.get()
            released = max(arrived + self.link.one_way_s, released)
            if isinstance(item, bytes):
                released += 8 * len(item) / profile.down_bps
            delay = released - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if item is self._END:
                return
            if isinstance(item, Exception):
                raise item
            self.link._count(down=len(item))
            yield item

    def close(self) -> None:
        self.stream.close()
