"""A bare device's side of the cloud protocol over HTTP, for the cloud API's own tests (late,
ignored and malformed answers on purpose — what `device_agent` never does) and for
`benchmarks/cloud_overhead.py`.

It deliberately does not import `cloud_api`: like the real device, it knows the server only
through HTTP and the documented encodings (taps and g(x): raw little-endian values of the tap
dtype, C order; shapes in the JSON events).
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import torch
from torch import Tensor

from personalization.side import SideCache, SideNetwork
from protocol import wire


def from_raw(data: bytes, dtype: str, shape: list[int]) -> Tensor:
    return wire.decode(data, dtype, shape)


class SideDevice:
    """The private side network g with its own cache, answering side requests.

    A side request carries taps from `start`, the first position the cloud knows this device has
    processed; a device that is further along (it answered too late) crops its cache back to it.
    """

    def __init__(self, side: SideNetwork):
        self.side = side
        self.cache: SideCache = side.new_cache()

    def g(self, event: dict) -> Tensor:
        taps = from_raw(base64.b64decode(event["taps"]), event["dtype"], event["shape"])
        start = event["start"]
        if self.cache.length > start:  # an answer of ours arrived after its deadline
            self.cache.kv = [
                None if e is None else (e[0][:, :, :start], e[1][:, :, :start])
                for e in self.cache.kv
            ]
        assert self.cache.length == start, "the cloud re-sends from the first unseen position"
        with torch.no_grad():
            return self.side(taps.float()[None], self.cache)[:, -1]


@dataclass
class Run:
    """What a device saw in one session."""

    session: dict
    events: list[dict] = field(default_factory=list)
    late_answers: list[httpx.Response] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # perf_counter() as each event arrived

    @property
    def tokens(self) -> list[dict]:
        return [e for e in self.events if e["event"] == "token"]

    @property
    def side_requests(self) -> list[dict]:
        return [e for e in self.events if e["event"] == "side_request"]

    @property
    def done(self) -> dict:
        return self.events[-1]

    @property
    def ids(self) -> list[int]:
        return [t["id"] for t in self.tokens]

    @property
    def branches(self) -> list[str]:
        return [t["branch"] for t in self.tokens]


class CloudClient:
    """One registered device talking to the cloud with httpx."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 60.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    @classmethod
    def register(cls, url: str, name: str = "device") -> CloudClient:
        response = httpx.post(f"{url}/v1/devices", json={"name": name}, timeout=30)
        response.raise_for_status()
        return cls(url, response.json()["token"])

    def close(self) -> None:
        self.http.close()

    def open(self, **body) -> dict:
        response = self.http.post("/v1/sessions", json=body)
        assert response.status_code == 201, response.text
        return response.json()

    def events(self, session_id: str) -> Iterator[dict]:
        with self.http.stream("GET", f"/v1/sessions/{session_id}/events") as response:
            assert response.status_code == 200, response.read().decode()
            for line in response.iter_lines():
                if line:
                    yield json.loads(line)

    def answer(
        self, session_id: str, request_id: int, g: Tensor, dtype: str = "float16", *, as_json=False
    ) -> httpx.Response:
        url = f"/v1/sessions/{session_id}/side-requests/{request_id}/answer"
        raw = wire.encode(g, dtype)
        if as_json:
            return self.http.post(url, json={"g": base64.b64encode(raw).decode(), "dtype": dtype})
        headers = {"Content-Type": "application/octet-stream", "X-SPA-Dtype": dtype}
        return self.http.post(url, content=raw, headers=headers)

    def run(
        self,
        device: SideDevice | None,
        *,
        respond: Callable[[dict], str] = lambda _event: "answer",
        **body,
    ) -> Run:
        """Open a session and follow it to the end. `respond(side_request)` says what to do:
        "answer" at once, "ignore" it, or answer "late": compute g(x) at once but post it only
        once the cloud has emitted the request's (fallback) token — deterministically late."""
        run = Run(self.open(**body))
        sid = run.session["session_id"]
        late: dict[int, Tensor] = {}
        for event in self.events(sid):
            run.events.append(event)
            run.arrivals.append(time.perf_counter())
            if event["event"] == "token" and event["request_id"] in late:
                rid = event["request_id"]
                response = self.answer(sid, rid, late.pop(rid), run.session["tap_dtype"])
                run.late_answers.append(response)
            if event["event"] != "side_request" or device is None:
                continue
            action = respond(event)
            if action == "ignore":
                continue
            g = device.g(event)
            if action == "late":
                late[event["request_id"]] = g
                continue
            response = self.answer(sid, event["request_id"], g, event["dtype"])
            assert response.status_code == 200, response.text
        assert run.done["event"] == "done"
        return run


@contextlib.contextmanager
def device(url: str, name: str = "device") -> Iterator[CloudClient]:
    client = CloudClient.register(url, name)
    try:
        yield client
    finally:
        client.close()
