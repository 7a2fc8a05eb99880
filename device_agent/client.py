"""The device's HTTP client for the cloud API — the only way the device reaches the backbone.

Every call has a timeout. Idempotent calls (info, head, tokenize, features, reading a session's
record, answering a side request — a repeated answer is a 409 the device ignores) are retried
with exponential backoff and jitter (tenacity) on connection errors, 5xx and 429; opening a
session is not (a repeat would open two). A broken event stream is resumed by the generation
(`events(after=N)`). Errors surface as `CloudUnreachable` / `CloudError` with a message a person
can act on.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from pydantic import BaseModel
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential, wait_random

from device_agent.errors import CloudError, CloudUnreachable, ProtocolMismatch
from device_agent.netem import EmulatedLink
from personalization.backbone.head import BackboneFacts
from personalization.files import atomic_path
from personalization.latency import NetworkProfile
from personalization.training.data import Example, Record
from personalization.training.features import Features
from protocol import PROTOCOL_VERSION, wire
from protocol.events import Event, parse_event
from protocol.messages import (
    CodesOut,
    ExampleIn,
    FeaturesIn,
    Info,
    RecommendIn,
    RecommendOut,
    RecommendSessionIn,
    RecordIn,
    SessionIn,
    SessionOut,
    SessionRecord,
    TokenizeIn,
    TokenizeOut,
    VerdictIn,
)

BINARY = "application/octet-stream"
JSON = "application/json"
FEATURE_FIELDS = ("taps", "final", "base_logprob", "labels")


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """Timeouts (seconds) and retry policy of the device's calls."""

    connect_s: float = 5.0
    read_s: float = 120.0  # a features batch or an idle event stream may take this long
    attempts: int = 4  # tries of an idempotent call before giving up
    backoff_s: float = 0.25  # first wait; doubles (with jitter) up to backoff_max_s
    backoff_max_s: float = 4.0
    ca_file: str | None = None  # trust this CA (PEM) for an HTTPS cloud; else $SSL_CERT_FILE,
    # else the system's and certifi's roots (httpx's default)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, CloudError):
        return exc.status >= 500 or exc.status == 429
    return isinstance(exc, httpx.TransportError)


def _idempotent(method: Callable) -> Callable:
    """Retry `method` on transient failures with the client's policy, then translate errors."""

    def call(self: CloudClient, *args, **kwargs):
        cfg = self.config
        retrying = retry(
            retry=retry_if_exception(_transient),
            stop=stop_after_attempt(cfg.attempts),
            wait=wait_exponential(multiplier=cfg.backoff_s, max=cfg.backoff_max_s)
            + wait_random(0, cfg.backoff_s),
            reraise=True,
        )
        try:
            return retrying(method)(self, *args, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    call.__name__, call.__doc__ = method.__name__, method.__doc__
    return call


class CloudClient:
    """One device's authenticated connection to the cloud API."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        profile: NetworkProfile | None = None,
        config: ClientConfig | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        self.url = url.rstrip("/")
        self.config = config or ClientConfig()
        if transport is None and self.config.ca_file is not None:
            context = ssl.create_default_context(cafile=self.config.ca_file)
            transport = httpx.HTTPTransport(verify=context)
        self.link = EmulatedLink(profile, transport)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        timeout = httpx.Timeout(self.config.read_s, connect=self.config.connect_s)
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=self.link
        )
        self._info: Info | None = None
        self._codes: CodesOut | None = None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- plumbing ------------------------------------------------------------------------------
    def _unreachable(self, exc: Exception) -> CloudUnreachable:
        return CloudUnreachable(
            f"cannot reach the cloud at {self.url} ({type(exc).__name__}: {exc or 'no detail'}); "
            "is it running (`spa cloud`), and is the URL right?"
        )

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        response = self.http.request(method, path, **kwargs)
        _raise_for(response)
        return response

    def _post(self, path: str, body: BaseModel) -> httpx.Response:
        """POST a protocol model as JSON (defaults left out: the cloud fills them in)."""
        content = body.model_dump_json(exclude_unset=True)
        return self._send("POST", path, content=content, headers={"Content-Type": JSON})

    # ---- calls ---------------------------------------------------------------------------------
    def register(self, name: str, operator_token: str | None = None) -> tuple[str, str]:
        """A new device id and bearer token (not retried: each call registers a device). Where
        the cloud's registration is closed, only its operator's token registers."""
        headers = {"Authorization": f"Bearer {operator_token}"} if operator_token else None
        try:
            body = self._send("POST", "/v1/devices", json={"name": name}, headers=headers).json()
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        return body["device_id"], body["token"]

    def rotate_token(self) -> str:
        """A new bearer token for this device (the client uses it from now on; the old one
        stops working)."""
        try:
            token = self._send("POST", "/v1/devices/me/token").json()["token"]
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        self.http.headers["Authorization"] = f"Bearer {token}"
        return token

    def revoke(self) -> None:
        """Revoke this device's token (nothing authenticates with it afterwards)."""
        try:
            self._send("DELETE", "/v1/devices/me")
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    @_idempotent
    def ready(self) -> str:
        """The backbone's name once the cloud has loaded it (needs no device token)."""
        return self._send("GET", "/readyz").json()["backbone"]

    @_idempotent
    def info(self) -> Info:
        """The backbone's facts and the server's limits (cached for the client's lifetime);
        a cloud that speaks another protocol version is refused here, before anything else."""
        if self._info is None:
            info = Info.model_validate(self._send("GET", "/v1/info").json())
            if info.protocol_version != PROTOCOL_VERSION:
                raise ProtocolMismatch(
                    f"the cloud at {self.url} speaks protocol {info.protocol_version}, this "
                    f"device speaks {PROTOCOL_VERSION}; install the same spa-demo release on both"
                )
            self._info = info
        return self._info

    def facts(self) -> BackboneFacts:
        i = self.info()
        return BackboneFacts(
            i.backbone,
            i.fingerprint,
            i.num_layers,
            i.hidden_size,
            i.vocab_size,
            i.parameters["backbone"],
            frozenset(i.eos_token_ids),
        )

    @_idempotent
    def head(self, path: Path, dtype: str = "float32", codes: str | None = None) -> None:
        """Download the frozen final norm + LM head (safetensors) to `path` (the device's
        largest download); with `codes`, the head over those item codes."""
        params = {"dtype": dtype} | ({"codes": codes} if codes else {})
        self._download(path, "/v1/head", params)

    @_idempotent
    def codes(self) -> CodesOut:
        """The cloud's item codes (public: built from its catalogue's titles alone; cached for
        the client's lifetime, as `info` is: a whole catalogue, wanted by training, loading a
        checkpoint and evaluation alike)."""
        if self._codes is None:
            self._codes = CodesOut.model_validate(self._send("GET", "/v1/codes").json())
        return self._codes

    @_idempotent
    def codec(self, path: Path, name: str) -> None:
        """Download the public basis of tap encoding `name` (safetensors) to `path`."""
        self._download(path, f"/v1/codec/{name}", {})

    def _download(self, path: Path, url: str, params: dict) -> None:
        """A GET streamed to disk and renamed into place only once complete."""
        with (
            atomic_path(path) as tmp,
            open(tmp, "wb") as f,
            self.http.stream("GET", url, params=params) as response,
        ):
            if response.is_error:
                response.read()
                _raise_for(response)
            for chunk in response.iter_bytes(1 << 20):
                f.write(chunk)

    @_idempotent
    def tokenize(
        self,
        records: Sequence[Record],
        *,
        max_prompt_tokens: int,
        max_target_tokens: int,
        keep: str,
    ) -> list[Example]:
        """Records → examples, tokenised by the cloud exactly as in-process training does."""
        body = TokenizeIn(
            records=[
                RecordIn(instruction=r.instruction, input=r.input, output=r.output) for r in records
            ],
            max_prompt_tokens=max_prompt_tokens,
            max_target_tokens=max_target_tokens,
            keep=keep,
        )
        out = TokenizeOut.model_validate(self._post("/v1/tokenize", body).json())
        return [Example(tuple(e.prompt), tuple(e.target)) for e in out.examples]

    @_idempotent
    def features(
        self,
        examples: Sequence[Example],
        rungs: Sequence[int],
        dtype: str,
        codes: str | None = None,
    ) -> tuple[list[Features], dict[str, str]]:
        """Taps and backbone signals for examples (whose ids include item codes `codes`);
        also the payload's metadata."""
        body = FeaturesIn(
            examples=[ExampleIn(prompt=list(e.prompt), target=list(e.target)) for e in examples],
            rungs=list(rungs),
            dtype=dtype,
            codes=codes,
        )
        data = self._post("/v1/features", body).content
        tensors, meta = wire.unpack_with_metadata(data)
        out = [
            Features(**{k: tensors[f"{i}.{k}"] for k in FEATURE_FIELDS})
            for i in range(int(meta["count"]))
        ]
        return out, meta

    def open_session(self, body: SessionIn) -> SessionOut:
        try:
            return SessionOut.model_validate(self._post("/v1/sessions", body).json())
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    def events(self, session_id: str, after: int | None = None) -> Iterator[tuple[Event, int]]:
        """The session's typed events as they arrive, each with its size in bytes on the wire;
        `after` = N resumes a broken stream after the first N events."""
        params = {} if after is None else {"after": after}
        url = f"/v1/sessions/{session_id}/events"
        try:
            with self.http.stream("GET", url, params=params) as response:
                if response.is_error:
                    response.read()
                    _raise_for(response)
                for line in response.iter_lines():
                    if line:
                        yield parse_event(line), len(line.encode()) + 1
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    @_idempotent
    def answer(self, session_id: str, request_id: int, g: torch.Tensor, dtype: str) -> int:
        """Post g(x) for a side request; returns the bytes sent. A late or repeated answer
        (409) is fine: the cloud already moved on, with a fallback token or the first answer."""
        raw = wire.encode(g, dtype)
        url = f"/v1/sessions/{session_id}/side-requests/{request_id}/answer"
        headers = {"Content-Type": BINARY, "X-SPA-Dtype": dtype}
        response = self.http.post(url, content=raw, headers=headers)
        if response.status_code != 409:
            _raise_for(response)
        return len(raw)

    @_idempotent
    def verdict(self, session_id: str, body: VerdictIn) -> tuple[int, bool]:
        """Run-ahead: post a correction or the word that the drafts stand; returns the bytes
        sent and whether the cloud took it (a 409 — a superseded epoch, or a session that has
        ended — is not an error: the cloud's drafts stood)."""
        content = body.model_dump_json()
        response = self.http.post(
            f"/v1/sessions/{session_id}/verdicts", content=content, headers={"Content-Type": JSON}
        )
        if response.status_code != 409:
            _raise_for(response)
        return len(content), response.status_code != 409

    def cancel(self, session_id: str) -> None:
        with contextlib.suppress(httpx.TransportError):  # gone: nothing left to cancel
            self.http.post(f"/v1/sessions/{session_id}/cancel", timeout=5.0)

    def open_recommendation(self, body: RecommendSessionIn) -> SessionOut:
        """A recommendation session that asks this device's side network (`recommend.py`)."""
        try:
            response = self._post("/v1/recommendations/sessions", body)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        return SessionOut.model_validate(response.json())

    @_idempotent
    def recommend(self, body: RecommendIn) -> RecommendOut:
        """The cloud's top-K catalogue items for a purchase history (a read: retried)."""
        return RecommendOut.model_validate(self._post("/v1/recommendations", body).json())

    @_idempotent
    def session_record(self, session_id: str) -> SessionRecord:
        return SessionRecord.model_validate(self._send("GET", f"/v1/sessions/{session_id}").json())


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:  # not the cloud's JSON: a proxy in front of it (an HTML error page)
        detail = response.reason_phrase
        if response.status_code in (502, 503, 504):
            detail += " from a proxy: the cloud replica behind it is down or unreachable"
    if not isinstance(detail, str):
        detail = json.dumps(detail)
    raise CloudError(response.status_code, detail)
