"""`spa device serve`: this device behind the OpenAI API, so any app that speaks it is personalised.

`POST /v1/chat/completions`, `POST /v1/completions` (both streamed as server-sent events or not)
and `GET /v1/models` map onto `DeviceAgent.generate`: the side network, the gate and the history
stay on the device, and what crosses the wire is exactly what SPA's protocol sends (the privacy
test captures it). A model is `spa:<user>` (the newest checkpoint), `spa:<user>:<setting>` (each
trained setting) or `base`. Each request opens the device afresh, so concurrent requests share
nothing but the cloud, whose scheduler batches them. Mapping rules are in docs/openai.md.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from device_agent.agent import DeviceAgent
from device_agent.client import ClientConfig
from device_agent.errors import CloudError, CloudUnreachable, DeviceError, NotTrained
from device_agent.generation import RemoteGeneration, TokenCost
from device_agent.openai_schema import (
    ChatRequest,
    CompletionRequest,
    ErrorBody,
    ErrorResponse,
    GenerationRequest,
    Model,
    ModelList,
    TokenExtra,
    Usage,
)
from personalization.config import DecodeConfig
from personalization.errors import ConfigError
from personalization.latency import NetworkProfile
from personalization.latency import profile as named_profile

DEFAULT_MAX_TOKENS = {
    True: 256,
    False: 16,
}  # chat: the cloud's default limit; completions: OpenAI's


#: opens one user's device (close it after use), over an emulated network profile or none
Opener = Callable[[NetworkProfile | None], DeviceAgent]


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    users: Mapping[str, Opener]  # models spa:<user>…, in this order; `base` runs on the first
    api_key: str | None = None  # required as a bearer token when set


def device_opener(
    root: Path,
    *,
    cloud_url: str | None = None,
    client_config: ClientConfig | None = None,
    transport: httpx.BaseTransport | None = None,
) -> Opener:
    """The device directory at `root` (talking to `cloud_url`, else the cloud it registered
    with); `transport` lets tests capture what it sends."""

    def open_device(profile: NetworkProfile | None) -> DeviceAgent:
        return DeviceAgent(
            root,
            cloud_url=cloud_url,
            client_config=client_config,
            profile=profile,
            transport=transport,
        )

    return open_device


class OpenAIError(Exception):
    """An error the OpenAI clients understand: status, message, and the field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.body = (
            status,
            ErrorBody(message=message, type=kind, param=param, code=code),
        )

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=self.body).model_dump(), status_code=self.status)


def _device_error(exc: DeviceError) -> OpenAIError:
    if isinstance(exc, CloudUnreachable):
        return OpenAIError(
            503, f"the cloud is unreachable: {exc}", code="cloud_unreachable", kind="api_error"
        )
    if isinstance(exc, CloudError) and exc.status >= 500:
        return OpenAIError(503, str(exc), code="cloud_unavailable", kind="api_error")
    if isinstance(exc, NotTrained):
        return OpenAIError(404, str(exc), param="model", code="model_not_found")
    return OpenAIError(400, str(exc))


class _Stops:
    """Stop sequences over streamed text: text that may begin a stop sequence is held back
    until it cannot, so no part of a stop sequence is ever shown."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending = stops, ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to show, whether a stop sequence ended the answer)."""
        self.pending += text
        hits = [i for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        held = max(
            (k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])),
            default=0,
        )
        cut = len(self.pending) - held
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class _Run:
    """One request's generation on a freshly opened device: its pieces of text with their
    tokens, then how it finished and what it cost."""

    def __init__(self, agent: DeviceAgent, generation: RemoteGeneration, req: GenerationRequest):
        self.agent, self.generation, self.limit = (
            agent,
            generation,
            generation.decode.max_new_tokens,
        )
        self.stops, self.stopped = _Stops(req.stop), False
        self.tokens = iter(generation)
        try:  # the first token, so that a refused or unreachable cloud is the response's status
            self.first: TokenCost | None = next(self.tokens)
        except StopIteration:
            self.first = None
        except BaseException:
            agent.close()
            raise

    def pieces(self) -> Iterator[tuple[str, TokenCost | None]]:
        """(text to show, the token it came from); a held-back remainder comes last."""
        try:
            token = self.first
            while token is not None:
                text, self.stopped = self.stops.feed(token.text)
                yield text, token
                if self.stopped:
                    self.tokens.close()  # cancels the cloud's session
                    return
                token = next(self.tokens, None)
            if rest := self.stops.flush():
                yield rest, None
        finally:
            self.agent.close()

    @property
    def finish_reason(self) -> str:
        reached = len(self.generation.tokens) >= self.limit
        return "length" if reached and not self.stopped else "stop"

    def usage(self) -> Usage:
        g = self.generation
        prompt = g.session.prompt_tokens if g.session else 0
        done = len(g.tokens)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=done,
            total_tokens=prompt + done,
            spa=g.accounts.summary() | {"setting": g.setting},
        )


def _extra(token: TokenCost) -> dict:
    return TokenExtra(branch=token.branch, p_device=token.gate_prob, token_id=token.id).model_dump()


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class Front:
    """What the routes do: resolve a model to a user and setting, start the generation on a
    freshly opened device, and shape its tokens as OpenAI objects."""

    def __init__(self, config: ServeConfig):
        if not config.users:
            raise ConfigError("no device to serve")
        self.users = dict(config.users)

    def models(self) -> dict[str, tuple[str, str | None]]:
        """Model id → (user, setting; None: the newest checkpoint's)."""
        out: dict[str, tuple[str, str | None]] = {}
        for user, open_device in self.users.items():
            with open_device(None) as agent:
                trained = sorted({c.setting for c in agent.store.checkpoints()})
            if trained:
                out[f"spa:{user}"] = (user, None)
                out |= {f"spa:{user}:{s}": (user, s) for s in trained}
        return out | {"base": (next(iter(self.users)), "base")}

    def start(self, req: GenerationRequest, prompt: str | list, *, chat: bool) -> _Run:
        served = self.models()
        if req.model not in served:
            raise OpenAIError(
                404,
                f"the model {req.model!r} does not exist on this device; it serves "
                f"{', '.join(served)}",
                param="model",
                code="model_not_found",
            )
        user, setting = served[req.model]
        temperature = 1.0 if req.temperature is None else req.temperature
        try:
            decode = DecodeConfig(
                strategy="greedy" if temperature == 0 else "sample",
                temperature=temperature or 1.0,
                top_p=req.top_p or 1.0,
                seed=req.seed,
                max_new_tokens=req.limit or DEFAULT_MAX_TOKENS[chat],
                repetition_penalty=req.repetition_penalty or 1.0,
            )
        except ConfigError as exc:
            raise OpenAIError(400, str(exc)) from None
        profile = named_profile(req.spa.profile) if req.spa.profile else None
        agent = self.users[user](profile)
        try:
            generation = agent.generate(
                prompt,
                setting=req.spa.setting or setting,
                decode=decode,
                strict=req.spa.strict,
                chat=chat,
                threshold=req.spa.threshold,
                deadline_s=req.spa.deadline_s,
                tap_mode=req.spa.tap_mode,
            )
            return _Run(agent, generation, req)
        except DeviceError as exc:
            agent.close()
            raise _device_error(exc) from None

    @staticmethod
    def reply(run: _Run, req: GenerationRequest, *, chat: bool) -> dict:
        """The whole answer as one chat.completion or text_completion object."""
        pieces = list(run.pieces())
        text = "".join(piece for piece, _ in pieces)
        choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        return _head(req, chat) | {
            "object": "chat.completion" if chat else "text_completion",
            "choices": [
                {"index": 0, **choice, "logprobs": None, "finish_reason": run.finish_reason}
            ],
            "usage": run.usage().model_dump(),
            "spa": {"tokens": [_extra(token) for _, token in pieces if token]},
        }

    @staticmethod
    def stream(run: _Run, req: GenerationRequest, *, chat: bool) -> Iterator[str]:
        """The answer as server-sent chunks: one per token, a last one with the finish
        reason, then the usage (when asked for) and [DONE]."""
        head = _head(req, chat) | {"object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(text: str | None, finish: str | None = None, **extra) -> str:
            if chat:
                delta = {
                    "delta": {} if text is None else {"content": text, **extra.pop("delta", {})}
                }
            else:
                delta = {"text": text or ""}
            choice = {"index": 0, **delta, "logprobs": None, "finish_reason": finish}
            return _sse(head | {"choices": [choice]} | extra)

        if chat:
            yield chunk("", delta={"role": "assistant"})
        try:
            for text, token in run.pieces():
                yield chunk(text, **({"spa": _extra(token)} if token else {}))
        except DeviceError as exc:  # the status is already sent: say it in the stream
            yield _sse(ErrorResponse(error=_device_error(exc).body).model_dump())
            return
        yield chunk(None, run.finish_reason)
        if req.include_usage:
            yield _sse(head | {"choices": [], "usage": run.usage().model_dump()})
        yield _sse("[DONE]")


def _head(req: GenerationRequest, chat: bool) -> dict:
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    return {"id": rid, "created": int(time.time()), "model": req.model}


def create_app(config: ServeConfig) -> FastAPI:
    """The FastAPI app serving `config.users`' devices."""
    front = Front(config)
    app = FastAPI(
        title="spa device (OpenAI-compatible)",
        version="1",
        description="This device's personalised generation in the OpenAI API's shape.",
    )

    @app.exception_handler(OpenAIError)
    async def _openai_error(_request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception) -> JSONResponse:  # logged by uvicorn
        message = f"the device failed to answer ({type(exc).__name__}); its log has the details"
        return OpenAIError(500, message, kind="server_error").response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        message = first["msg"].removeprefix("Value error, ")
        return OpenAIError(400, f"{param}: {message}" if param else message, param=param).response()

    @app.middleware("http")
    async def _bearer(request: Request, call_next):
        if config.api_key is not None:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), config.api_key.encode()):
                return OpenAIError(
                    401,
                    "a valid API key is needed: Authorization: Bearer <key>",
                    code="invalid_api_key",
                ).response()
        return await call_next(request)

    @app.get("/v1/models", response_model=ModelList)
    def list_models() -> ModelList:
        now = int(time.time())
        return ModelList(
            data=[
                Model(id=m, created=now, spa={"user": user, "setting": setting or "newest"})
                for m, (user, setting) in front.models().items()
            ]
        )

    def answer(req: GenerationRequest, prompt: str | list, *, chat: bool):
        run = front.start(req, prompt, chat=chat)
        if not req.stream:
            return front.reply(run, req, chat=chat)
        return StreamingResponse(
            front.stream(run, req, chat=chat),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        return answer(req, req.conversation(), chat=True)

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        return answer(req, req.prompt, chat=False)

    return app
