"""The OpenAI API's request and response shapes, as far as a device serves them.

Requests are read leniently where the OpenAI clients send fields we have no use for (they are
ignored, as vLLM ignores them) and strictly where a field would change the answer and we cannot
honour it (`n` > 1, tools, log-probabilities, `echo`, `suffix`): that is a 400 naming the field,
never a silently different answer. Responses are the OpenAI objects plus a `spa` object the
clients keep as an extra field: per streamed token its branch and p(device), in `usage` the
round trips and bytes that SPA adds.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from personalization.config import SERVED_SETTINGS, TapMode
from personalization.latency import PROFILES

Finite = Annotated[float, Field(allow_inf_nan=False)]


class SpaOptions(BaseModel):
    """SPA's own knobs, sent as `extra_body={"spa": {...}}` by the OpenAI clients."""

    model_config = ConfigDict(extra="forbid")
    setting: Literal[SERVED_SETTINGS] | None = Field(
        None, description="Overrides the model name's setting."
    )
    tap_mode: TapMode | None = Field(None, description="pull, streamed or run-ahead.")
    profile: Literal[tuple(PROFILES)] | None = Field(None, description="Emulate a network.")
    strict: bool = Field(False, description="Keep the gate on the device (asked every token).")
    threshold: Finite | None = Field(None, description="Gate threshold; default: calibrated.")
    deadline_s: Finite | None = Field(None, gt=0, description="How long the cloud waits for g(x).")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """A chat turn; `developer` is OpenAI's newer name for `system`."""

    model_config = ConfigDict(extra="ignore")  # name, refusal, … carry nothing we use
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class GenerationRequest(BaseModel):
    """What chat and completion requests share."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: Finite | None = Field(None, ge=0, le=2)
    top_p: Finite | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    frequency_penalty: Finite | None = Field(None, ge=-2, le=2)  # accepted, ignored
    presence_penalty: Finite | None = Field(None, ge=-2, le=2)  # accepted, ignored
    repetition_penalty: Finite | None = Field(None, gt=0, le=10)  # vLLM's extra parameter
    logprobs: bool | int | None = None
    spa: SpaOptions = Field(default_factory=SpaOptions)

    @field_validator("n")
    @classmethod
    def _one(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n = 1 is served: one device generates one answer at a time")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty stop sequences")
        return stops

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | int | None) -> None:
        if value:
            raise ValueError("log-probabilities are not served (the device sees one branch)")
        return None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list | None) -> None:
        if value:
            raise ValueError("tool calling is not served")
        return None

    @model_validator(mode="after")
    def _user_last(self) -> ChatRequest:
        if self.messages[-1].role not in ("user", "system", "developer"):
            raise ValueError("the last message must be the user's (the answer comes next)")
        return self

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        """The turns as the chat template takes them."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


class CompletionRequest(GenerationRequest):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[str], Field(min_length=1)]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1 or not value[0]:
                raise ValueError("one non-empty prompt per request")
            return value[0]
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.echo or self.suffix or (self.best_of or 1) > 1:
            raise ValueError("echo, suffix and best_of are not served")
        return self

    @property
    def limit(self) -> int | None:
        return self.max_tokens


# ---- responses ----------------------------------------------------------------------------------
class TokenExtra(BaseModel):
    """Per generated token: which branch produced it and the gate's p(device)."""

    branch: str
    p_device: float | None
    token_id: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    spa: dict[str, Any] = Field(description="The generation's books: M, contacts, bytes, times.")


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "spa-device"
    spa: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
