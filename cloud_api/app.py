"""The FastAPI application: routes of the /v1 API, health checks, limits, error handling.

`create_app(settings)` builds it; `cloud_api.server` serves it with uvicorn. Routes that compute
are plain `def` (FastAPI runs them in its thread pool) or hand the work to a session's own
thread, so the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from cloud_api import __version__, auth, errors, metrics, training
from cloud_api.db import DeviceRow
from cloud_api.errors import ApiError
from cloud_api.run_ahead import RunAheadSession
from cloud_api.sessions import END, Session
from cloud_api.settings import CloudSettings
from cloud_api.state import Cloud
from personalization.backbone.frozen import Backbone
from personalization.config import WireDtype
from protocol import wire
from protocol.messages import (
    AnswerIn,
    AnswerOut,
    CodesOut,
    DeviceIn,
    DeviceOut,
    FeaturesIn,
    Info,
    RecommendIn,
    RecommendOut,
    RecommendSessionIn,
    SessionIn,
    SessionOut,
    SessionRecord,
    TokenizeIn,
    TokenizeOut,
    VerdictIn,
    VerdictOut,
)

NDJSON = "application/x-ndjson"
BINARY = "application/octet-stream"
Device = Annotated[DeviceRow, Depends(auth.current_device)]
SessionId = Annotated[str, Path(max_length=64, description="From POST /v1/sessions.")]

DESCRIPTION = """The frozen backbone of SPA (Side Plugin Adaption) as a streaming service.

Register with `POST /v1/devices` and send the token as `Authorization: Bearer <token>`.
A session streams NDJSON events (`start`, `token`, `side_request`, … `done`; docs/protocol.md
lists them all); answer each `side_request` with g(x) before its deadline, or the token falls
back to the backbone's own. Taps cross the wire in the session's tap encoding (default
`lowrank32-int8`: int8 coordinates in the low-rank basis published at `GET /v1/codec/{name}`);
g(x) is H raw little-endian values of the tap dtype (float16 by default); features and the head
are safetensors.
"""

_ANSWER_BODY = {
    "requestBody": {
        "required": True,
        "description": "g(x): H raw little-endian values in the session's tap dtype, or JSON.",
        "content": {
            BINARY: {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": AnswerIn.model_json_schema()},
        },
    }
}
_FORBIDDEN = {"description": "needs the operator's token"}
_BINARY_RESPONSE = {200: {"content": {BINARY: {"schema": {"type": "string", "format": "binary"}}}}}
_ERRORS = {
    code: {"description": text, "content": {"application/json": {"example": {"detail": text}}}}
    for code, text in {
        401: "missing, unknown or revoked bearer token",
        429: "over the device's rate limit (see Retry-After)",
        404: "no such session (or not this device's)",
        413: "request too large",
        422: "invalid request",
        503: "the backbone is still loading",
    }.items()
}


def create_app(settings: CloudSettings | None = None, backbone: Backbone | None = None) -> FastAPI:
    """The application; `backbone` skips loading (tests and embedding), else it loads at startup."""
    settings = settings or CloudSettings()
    cloud = Cloud(settings, backbone)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        cloud.records.close_stale("the server restarted while the session was live")
        cloud.load_in_background()
        sweeper = asyncio.create_task(_sweep(cloud))
        try:
            yield
        finally:
            sweeper.cancel()
            cloud.close()

    app = FastAPI(
        title="spa-demo cloud API",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        responses=_ERRORS,
    )
    app.state.cloud = cloud
    app.state.access = auth.Access(settings)
    app.state.metrics = metrics.registry(cloud)
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.include_router(_health)
    app.include_router(_v1)
    return app


async def _sweep(cloud: Cloud) -> None:
    """Expire idle sessions every few seconds (in a thread: ending a session writes records)."""
    while True:
        await asyncio.sleep(cloud.settings.sweep_interval_s)
        await anyio.to_thread.run_sync(cloud.registry.sweep)


def _cloud(request: Request) -> Cloud:
    return request.app.state.cloud


# ---- health ------------------------------------------------------------------------------------
_health = APIRouter(tags=["health"])


@_health.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers (whether or not the backbone is loaded)."""
    return {"status": "ok"}


@_health.get("/readyz", responses={503: {"description": "loading, or failed to load"}})
def readyz(request: Request) -> JSONResponse:
    """Ready once the backbone is loaded."""
    cloud = _cloud(request)
    if cloud.backbone is not None:
        return JSONResponse({"status": "ready", "backbone": cloud.backbone.name})
    if cloud.load_error:
        return JSONResponse({"status": "failed", "detail": cloud.load_error}, status_code=503)
    return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "2"})


@_health.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
def prometheus(request: Request) -> Response:
    """Load in the Prometheus text format: live sessions, batched passes, sequences stepped
    (tokens), rows per pass (cloud_api/metrics.py)."""
    return Response(metrics.render(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


# ---- /v1 -----------------------------------------------------------------------------------------
_v1 = APIRouter(prefix="/v1")


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(auth.bearer)]


@_v1.post("/devices", status_code=201, tags=["devices"], responses={403: _FORBIDDEN})
def register(request: Request, credentials: Credentials, body: DeviceIn | None = None) -> DeviceOut:
    """Register a device; the bearer token in the answer is shown once. Where registration is
    closed (`spa cloud --registration closed`, the default off loopback) only the operator's
    token may register."""
    access: auth.Access = request.app.state.access
    if access.registration == "closed":
        access.require_operator(credentials, "registration on this cloud is closed: registering")
    body = body or DeviceIn()
    token = auth.new_token()
    row = _cloud(request).records.add_device(
        auth.new_device_id(), body.name, auth.hash_token(token)
    )
    return DeviceOut(device_id=row.id, name=row.name, token=token)


@_v1.post("/devices/me/token", tags=["devices"])
def rotate_token(request: Request, device: Device) -> DeviceOut:
    """A new bearer token for the calling device; the one used for this call stops working."""
    token = auth.new_token()
    _cloud(request).records.set_token_hash(device.id, auth.hash_token(token))
    return DeviceOut(device_id=device.id, name=device.name, token=token)


@_v1.delete("/devices/me", status_code=204, tags=["devices"])
def revoke_own_token(request: Request, device: Device) -> Response:
    """Revoke the calling device's token (a lost or retired device); nothing else changes."""
    _cloud(request).records.set_token_hash(device.id, auth.revoked_hash())
    return Response(status_code=204)


@_v1.delete("/devices/{device_id}", status_code=204, tags=["devices"], responses={403: _FORBIDDEN})
def revoke_token(
    request: Request, credentials: Credentials, device_id: Annotated[str, Path(max_length=32)]
) -> Response:
    """The operator revokes a device's token."""
    request.app.state.access.require_operator(credentials, "revoking another device's token")
    if _cloud(request).records.set_token_hash(device_id, auth.revoked_hash()) is None:
        raise ApiError(404, f"no device {device_id!r}")
    return Response(status_code=204)


@_v1.get("/info", tags=["info"])
def info(request: Request, _device: Device) -> Info:
    """Backbone, L, H, vocabulary, rungs, tap precision, limits, version."""
    return _cloud(request).info()


@_v1.get("/head", tags=["training"], response_class=Response, responses=_BINARY_RESPONSE)
def head(
    request: Request,
    _device: Device,
    dtype: WireDtype = "float16",
    codes: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """The frozen final norm + LM head (safetensors): the device trains g through them. With
    `codes` (GET /v1/codes' fingerprint) the head over item codes instead: the code rows, after
    `offset` text tokens that a recommender never generates."""
    return Response(_cloud(request).head(dtype, codes), media_type=BINARY)


@_v1.get("/codec/{name}", tags=["sessions"], response_class=Response, responses=_BINARY_RESPONSE)
def codec(request: Request, _device: Device, name: Annotated[str, Path(max_length=64)]) -> Response:
    """The public basis of a tap encoding (safetensors `mean` [L, H], `vectors` [L, H, K], with
    the backbone's fingerprint): the cloud fits it on its own public corpus, never on user data;
    a device fetches it once to decode (and train on) low-rank taps."""
    return Response(_cloud(request).codec(name), media_type=BINARY)


@_v1.post("/tokenize", tags=["training"])
def tokenize(request: Request, body: TokenizeIn, _device: Device) -> TokenizeOut:
    """Training records → token ids, prepared exactly as in-process training prepares them, so
    a device can key its feature cache by content before asking for features."""
    return training.tokenize(_cloud(request).require_backbone(), body)


@_v1.post("/features", tags=["training"], response_class=Response, responses=_BINARY_RESPONSE)
def features(request: Request, body: FeaturesIn, _device: Device) -> Response:
    """Taps and per-token backbone signals for training examples (safetensors; see README)."""
    cloud = _cloud(request)
    backbone = cloud.require_backbone()
    if body.codes is not None:
        backbone = cloud.recommender().coded(body.codes)
    payload = training.features(backbone, body, cloud.settings, cloud.compute)
    return Response(payload, media_type=BINARY)


@_v1.get("/codes", tags=["recommendation"])
def codes(request: Request, _device: Device) -> CodesOut:
    """The catalogue's item codes — what the recommender generates — with their fingerprint: built
    from the titles alone, so public like the tap codec's basis. 404 without a catalogue."""
    return _cloud(request).recommender().codes()


@_v1.post("/recommendations", tags=["recommendation"])
def recommendations(request: Request, body: RecommendIn, _device: Device) -> RecommendOut:
    """The top-K items of the cloud's catalogue for a purchase history (titles, oldest first),
    ranked by the cloud's target — beam search, or strict speculative search (the same items).
    404 where the cloud serves no catalogue."""
    return _cloud(request).recommend(body)


@_v1.post("/recommendations/sessions", status_code=201, tags=["recommendation"])
def open_recommendation(request: Request, body: RecommendSessionIn, device: Device) -> SessionOut:
    """Recommend with the device's own side network: a session whose events ask the device for
    g(x) once per target pass over the token tree (`tree_request`, answered like a side request)
    and end with the items (`recommended`, then `done`). 404 without a catalogue."""
    return _session_out(_cloud(request).open_recommendation(device.id, body))


@_v1.post("/sessions", status_code=201, tags=["sessions"])
def open_session(request: Request, body: SessionIn, device: Device) -> SessionOut:
    """Open a generation session; it starts when the device opens its event stream."""
    return _session_out(_cloud(request).open_session(device.id, body))


def _session_out(session: Session) -> SessionOut:
    base = f"/v1/sessions/{session.id}"
    return SessionOut(
        **dict(session.facts()),
        status=session.status,
        events_url=f"{base}/events",
        answer_url=base + "/side-requests/{request_id}/answer",
        cancel_url=f"{base}/cancel",
        seed=session.decode.seed,
    )


@_v1.get("/sessions", tags=["sessions"])
def list_sessions(
    request: Request, device: Device, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[SessionRecord]:
    """This device's sessions, newest first."""
    rows = _cloud(request).records.sessions_of(device.id, limit)
    return [_record(request, SessionRecord.model_validate(row)) for row in rows]


@_v1.get("/sessions/{session_id}", tags=["sessions"])
def get_session(request: Request, session_id: SessionId, device: Device) -> SessionRecord:
    """One session: settings, status and totals (live while it runs)."""
    row = _cloud(request).records.get_session(session_id)
    if row is None or row.device_id != device.id:
        raise ApiError(404, f"no session {session_id} for this device")
    return _record(request, SessionRecord.model_validate(row))


def _record(request: Request, record: SessionRecord) -> SessionRecord:
    live = _cloud(request).registry.get(record.session_id)
    if live is None:
        return record
    return record.model_copy(update={"status": live.status} | live.totals.model_dump())


@_v1.get(
    "/sessions/{session_id}/events",
    tags=["sessions"],
    response_class=StreamingResponse,
    responses={200: {"content": {NDJSON: {"schema": {"type": "string"}}}}},
)
async def events(
    request: Request,
    session_id: SessionId,
    device: Device,
    after: Annotated[
        int | None,
        Query(ge=0, le=2**31, description="Resume: the event lines already read; the rest follow."),
    ] = None,
) -> StreamingResponse:
    """The session's events as NDJSON: start, taps, side_request, token, done. Generation runs
    while a stream is open; a broken one is resumed with `?after=N` (the session pauses until
    then, up to the server's resume_s; an ended session stays resumable as long)."""
    session = _cloud(request).owned_session(session_id, device.id, ended=after is not None)
    stream, queue = session.open_stream(asyncio.get_running_loop(), after)

    async def lines():
        try:
            while (line := await queue.get()) is not END:
                yield line
        finally:
            session.events.detach(stream)

    return StreamingResponse(lines(), media_type=NDJSON)


@_v1.post(
    "/sessions/{session_id}/side-requests/{request_id}/answer",
    tags=["sessions"],
    openapi_extra=_ANSWER_BODY,
)
async def answer(
    request: Request,
    session_id: SessionId,
    request_id: Annotated[int, Path(ge=1, le=2**31)],
    device: Device,
    x_spa_dtype: Annotated[WireDtype | None, Header(description="dtype of a binary g")] = None,
) -> AnswerOut:
    """The device's g(x) for one side request: binary (application/octet-stream, H raw values)
    or JSON {"g": base64, "dtype": ...}."""
    session = _cloud(request).owned_session(session_id, device.id)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    if kind == BINARY:
        data, dtype = body, x_spa_dtype or session.tap_dtype
    elif kind == "application/json":
        try:
            parsed = AnswerIn.model_validate_json(body)
        except ValidationError as exc:
            status, message = errors.validation_message(list(exc.errors()))
            raise ApiError(status, message) from None
        try:
            data, dtype = wire.b64decode(parsed.g, what="g"), parsed.dtype
        except wire.WireError as exc:
            raise ApiError(422, str(exc)) from None
    else:
        raise ApiError(415, f"send g as {BINARY} (raw {session.tap_dtype}) or application/json")
    session.answer(request_id, data, dtype)
    return AnswerOut(session_id=session.id, request_id=request_id, accepted=True)


@_v1.post("/sessions/{session_id}/verdicts", tags=["sessions"])
async def verdict(
    request: Request, session_id: SessionId, body: VerdictIn, device: Device
) -> VerdictOut:
    """Run-ahead: the device's correction of a draft (`token`), or its word that the drafts
    through `index` stand (`token` null, sent for the last draft). A stale epoch or a session
    that has ended is a 409: the verdict is ignored."""
    session = _cloud(request).owned_session(session_id, device.id)
    if not isinstance(session, RunAheadSession):
        raise ApiError(409, f"session {session_id} is not a run-ahead session; it takes answers")
    size = int(request.headers.get("content-length") or 0)
    epoch = session.verdict(body.epoch, body.index, body.token, size)
    return VerdictOut(session_id=session.id, epoch=epoch, accepted=True)


@_v1.post("/sessions/{session_id}/cancel", tags=["sessions"])
def cancel(request: Request, session_id: SessionId, device: Device) -> SessionRecord:
    """Stop a session; its stream ends with a `done` event whose status is `cancelled`."""
    cloud = _cloud(request)
    cloud.owned_session(session_id, device.id).cancel()
    return get_session(request, session_id, device)


# ---- limits ------------------------------------------------------------------------------------
class BodyLimit:
    """413 for a request body over the limit, counted as it arrives (chunked bodies too)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _reply(scope, send, 400, "the Content-Length header is not a number")
            if int(declared) > self.max_bytes:
                return await _reply(scope, send, 413, self._too_large(int(declared)))
        buffered, total = [], 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                return await _reply(scope, send, 413, self._too_large(total))
            if not message.get("more_body", False):
                break

        async def replay():
            return buffered.pop(0) if buffered else await receive()

        return await self.app(scope, replay, send)

    def _too_large(self, size: int) -> str:
        return (
            f"the request body has {size} bytes; the limit is {self.max_bytes} "
            "(SPA_CLOUD_MAX_BODY_BYTES)"
        )


async def _reply(scope, send, status: int, message: str) -> None:
    async def nothing():  # the response never reads the request
        return {"type": "http.disconnect"}

    await errors.error(status, message)(scope, nothing, send)
