"""Request and response bodies of the /v1 API (what /openapi.json documents).

The cloud validates requests with these models and builds its answers from them; the device
builds its requests and reads the answers with the same models.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from personalization.config import (
    GATED_SETTINGS,
    SERVED_SETTINGS,
    Setting,
    Strategy,
    TapEncoding,
    TapMode,
    WireDtype,
)

Finite = Annotated[float, Field(allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
#: a prompt or target: text the cloud tokenises, or token ids
Prompt = Annotated[str, Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)]


class ChatMessage(BaseModel):
    """One turn of a conversation, as chat templates (and OpenAI's API) take it."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


#: a session's prompt may also be a whole conversation, wrapped by the backbone's chat template
Conversation = Annotated[list[ChatMessage], Field(min_length=1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- devices -------------------------------------------------------------------------------------
class DeviceIn(Strict):
    name: str = Field("device", min_length=1, max_length=100)


class DeviceOut(BaseModel):
    device_id: str
    name: str
    token: str = Field(description="Bearer token; shown once, the server keeps only its hash.")


# ---- info ----------------------------------------------------------------------------------------
class Info(BaseModel):
    version: str = Field(description="The server's package version.")
    protocol_version: str = Field(description="protocol.PROTOCOL_VERSION; a device checks it.")
    backbone: str
    fingerprint: str
    num_layers: int = Field(description="L")
    hidden_size: int = Field(description="H")
    vocab_size: int
    eos_token_ids: list[int]
    chat_template: bool
    dtype: str = Field(
        "float32",
        description="Precision the backbone computes in (what crosses the wire: tap_dtype).",
    )
    rungs_offered: list[int] = Field(description="Every rung 1..L can be tapped.")
    default_rungs: list[int]
    tap_dtype: WireDtype = Field(description="Default precision of taps, g(x) and features.")
    tap_dtypes: list[WireDtype]
    tap_encoding: TapEncoding = Field(description="Default encoding of taps in sessions.")
    tap_encodings: list[TapEncoding] = Field(description="GET /v1/codec/{name}: their bases.")
    tap_mode: TapMode = Field(description="Default tap mode of sessions.")
    tap_modes: list[TapMode]
    settings: list[str] = Field(description="The settings a session serves.")
    strategies: list[str] = Field(description="The decoding strategies a session serves.")
    limits: dict[str, float | int]
    parameters: dict[str, int] = Field(
        description="Parameter counts: the backbone's, and what the in-layer baselines lora and "
        "adapter (rank 8) would train — for a device's what-if table."
    )


# ---- sessions ------------------------------------------------------------------------------------
class GateIn(Strict):
    """The device's gate σ = Linear(H, 2): 2·H + 2 numbers, the only learned parameters that
    leave the device. Either nested lists of floats, or base64 of little-endian float32."""

    weight: list[list[Finite]] | str = Field(description="[2, H] floats, or base64 fp32 (2·H)")
    bias: list[Finite] | str = Field(description="[2] floats, or base64 fp32 (2)")


class DecodingIn(Strict):
    strategy: Strategy = "greedy"
    max_new_tokens: int | None = Field(
        None, ge=1, description="Default: 64, or the server's limit where that is lower."
    )
    temperature: Finite = Field(1.0, gt=0)
    top_p: Finite = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63, description="Sampling seed; drawn if absent.")
    num_beams: int = Field(4, ge=1, le=8, description="Beams (strategy beam).")
    repetition_penalty: Finite = Field(
        1.0, gt=0, le=10, description="> 1 discourages tokens already in the prompt or output."
    )
    no_repeat_ngram_size: int = Field(
        0, ge=0, le=64, description="> 0: no n-gram of this many tokens occurs twice."
    )


class SessionIn(Strict):
    """Open a generation session (docs/protocol.md, "Generation")."""

    prompt: Prompt | Conversation = Field(
        description="Text (tokenised by the cloud), token ids, or a conversation (a list of "
        "{role, content} turns the cloud wraps in the backbone's chat template)."
    )
    chat: bool = Field(True, description="Wrap a text prompt in the backbone's chat template.")
    system: str | None = Field(None, description="System message of a text prompt.")
    setting: Setting = Field("spa", description=", ".join(SERVED_SETTINGS))
    threshold: Finite = Field(0.5, description="σ = 1 where the gate's p(device) ≥ threshold")
    gate: GateIn | None = Field(None, description="Needed by choice and spa unless strict.")
    strict: bool = Field(
        False, description="Keep the gate on the device: it is asked every token (M = 1)."
    )
    rungs: list[int] | None = Field(None, description="Rungs the side network reads; default L/4.")
    tap_dtype: WireDtype | None = Field(None, description="Precision of taps and g(x).")
    tap_encoding: TapEncoding | None = Field(None, description="How taps cross the wire.")
    tap_mode: TapMode | None = Field(
        None,
        description="pull: taps ride on side requests; streamed: pushed as they exist; "
        "run-ahead: the backbone drafts without waiting and the device corrects (spa, no gate).",
    )
    deadline_s: Finite | None = Field(None, gt=0, description="How long to wait for g(x).")
    decoding: DecodingIn = Field(default_factory=DecodingIn)

    @property
    def conversation(self) -> list[ChatMessage] | None:
        """The prompt's turns when it is a conversation."""
        return self.prompt if self.prompt and isinstance(self.prompt[0], ChatMessage) else None

    @field_validator("setting")
    @classmethod
    def _served(cls, value: str) -> str:
        if value not in SERVED_SETTINGS:
            raise ValueError(
                f"{value} puts device adapters inside every backbone layer (L or 2L round trips "
                "per token); it is an in-process baseline, not served over HTTP"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SessionIn:
        if self.conversation is not None and (self.system is not None or not self.chat):
            raise ValueError(
                "a conversation carries its own system turn and is always wrapped in the chat "
                "template: leave out system and chat"
            )
        if self.tap_mode == "run-ahead":
            problem = (
                "setting spa"
                if self.setting != "spa"
                else "no gate weights: the device applies its own"
                if self.gate is not None
                else "greedy or sampling (beam search stays synchronous)"
                if self.decoding.strategy == "beam"
                else None
            )
            if problem:
                raise ValueError(f"run-ahead needs {problem}")
            return self
        if self.setting in GATED_SETTINGS and self.gate is None and not self.strict:
            raise ValueError(
                f"setting {self.setting} needs the device's gate weights (gate) or strict mode "
                "(strict: true, the device is asked every token)"
            )
        if self.tap_mode == "streamed" and self.decoding.strategy == "beam":
            raise ValueError(
                "streamed taps serve greedy and sampling; beam search sends its rows with each "
                "side request (tap_mode: pull)"
            )
        if self.strict and self.decoding.strategy == "beam":
            raise ValueError(
                "strict mode decides σ on the device token by token; with beam search use the "
                "gate (send its weights) instead"
            )
        return self


class VerdictIn(Strict):
    """Run-ahead: the device's decision on draft `index` of `epoch`. `token` replaces the draft
    (a correction); None says the drafts through `index` stand (sent for the last draft)."""

    epoch: int = Field(ge=0, le=2**31)
    index: int = Field(ge=0, le=2**31)
    token: int | None = Field(None, ge=0, le=2**31)


class VerdictOut(BaseModel):
    session_id: str
    epoch: int = Field(description="the session's epoch after this verdict")
    accepted: bool


class RunAheadTotals(BaseModel):
    """What run-ahead did in a session (its `done` event)."""

    drafts: int = Field(0, description="tokens the backbone drafted, withdrawn ones included")
    corrections: int = Field(0, description="drafts the device replaced with its own token")
    withdrawn: int = Field(0, description="drafts thrown away after a correction")
    verified: bool = Field(
        False, description="the device decided every token (else the last drafts stand unchecked)"
    )


class SessionFacts(BaseModel):
    """What a session is: answered when it opens, repeated by its stream's `start` event."""

    session_id: str
    prompt_tokens: int
    setting: str
    strict: bool
    rungs: list[int]
    hidden_size: int
    tap_dtype: WireDtype
    tap_encoding: TapEncoding
    tap_mode: TapMode
    deadline_s: float


class SessionOut(SessionFacts):
    status: str
    events_url: str = Field(description="GET: the NDJSON event stream; generation starts there.")
    answer_url: str = Field(description="POST g(x) here; {request_id} from the side_request.")
    cancel_url: str
    seed: int | None


class SessionTotals(BaseModel):
    """What a session cost so far: in its record, and in its stream's `done` event."""

    model_config = ConfigDict(from_attributes=True)

    tokens: int = 0
    device_tokens: int = Field(0, description="tokens shaped by the device's g(x)")
    device_contacts: int = Field(0, description="side requests sent")
    fallbacks: int = Field(0, description="side requests whose deadline passed")
    tap_positions: int = Field(0, description="positions × rows whose taps were sent")
    bytes_to_device: int = Field(0, description="NDJSON bytes of the side_request events")
    bytes_from_device: int = Field(0, description="bodies of the answers")
    cloud_s: float = Field(0.0, description="backbone, gate and head compute")
    device_wait_s: float = Field(0.0, description="from each side request to its answer")
    wall_s: float = Field(0.0, description="stream opened → done")


class SessionRecord(SessionTotals):
    """A session as recorded: settings, status and totals."""

    session_id: str = Field(validation_alias=AliasChoices("id", "session_id"))  # row or JSON
    status: str
    reason: str
    setting: str
    strategy: str
    strict: bool
    threshold: float
    rungs: str
    tap_dtype: str
    deadline_s: float
    prompt_tokens: int
    max_new_tokens: int
    created_at: datetime
    finished_at: datetime | None


class AnswerIn(Strict):
    """g(x) for the side request's last position, as base64 of raw little-endian values (the
    binary alternative: the raw bytes as application/octet-stream)."""

    g: str = Field(description="base64 of H values in `dtype`")
    dtype: WireDtype = "float16"


class AnswerOut(BaseModel):
    session_id: str
    request_id: int
    accepted: bool


# ---- features ------------------------------------------------------------------------------------
class ExampleIn(Strict):
    """One training example, each part as token ids or as text the cloud tokenises (a text
    prompt with the chat template, a text target followed by EOS, as
    personalization.training.data.to_example does; ids are used exactly as given)."""

    prompt: Prompt
    target: Prompt
    chat: bool = Field(True, description="Wrap a text prompt in the backbone's chat template.")


class RecordIn(Strict):
    """A record as `personalization.training.data.Record`: the prompt is the instruction (and
    the input below it, cut to fit), the target is the output followed by EOS."""

    instruction: str = Field(min_length=1)
    input: str = ""
    output: str = Field(min_length=1)


class TokenizeIn(Strict):
    """Records → token ids exactly as in-process training prepares them (chat template,
    over-long inputs cut keeping their `start` or `end`, targets ending in EOS)."""

    records: list[RecordIn] = Field(min_length=1, max_length=1000)
    max_prompt_tokens: int = Field(512, ge=8)
    max_target_tokens: int = Field(64, ge=1)
    keep: Literal["start", "end"] = "start"


class TokenizedExample(BaseModel):
    prompt: list[int]
    target: list[int]


class TokenizeOut(BaseModel):
    examples: list[TokenizedExample]


class FeaturesIn(Strict):
    examples: list[ExampleIn] = Field(min_length=1)
    codes: str | None = Field(
        None,
        description="The fingerprint of the item codes (GET /v1/codes) whose tokens the ids "
        "include: the backbone reads them through the recommender's code rows.",
    )
    rungs: list[int] | None = Field(None, description="Default: the default rungs (about L/4).")
    dtype: WireDtype | None = Field(None, description="Precision of taps and final; default fp16.")


class RecommendIn(Strict):
    """A purchase history (titles, oldest first) → the top-K catalogue items."""

    # a title up to 2,048 characters: real catalogues have long ones (Beauty's longest is 879)
    history: list[Annotated[str, Field(min_length=1, max_length=2048)]] = Field(
        min_length=1, max_length=256
    )
    k: int = Field(10, ge=1, le=50, description="Items returned (= beams searched).")
    strategy: Literal["beam", "speculative-strict"] = Field(
        "beam",
        description="The target's own beam search, or strict speculative search (the same items, "
        "faster): γ steps drafted by the backbone's first layers, verified in one pass.",
    )
    gamma: int = Field(5, ge=1, le=16, description="Speculative: steps drafted per verification.")
    exclude_purchased: bool = Field(
        True, description="Never recommend an item of the history (purchases rarely repeat)."
    )


class RecommendedItem(BaseModel):
    title: str
    code: str = Field(description="The item's code, one token per level: <a_12><b_201><c_7><d_0>.")
    score: float = Field(description="The item's log-probability among catalogue items.")


class CodesOut(BaseModel):
    """The catalogue's item codes (public: built from the titles alone), with their fingerprint."""

    fingerprint: str = Field(description="Identity of the titles and their codes.")
    levels: int = Field(description="Residual-quantisation levels; a collision level follows.")
    codebook: int = Field(description="Codes per level.")
    length: int = Field(description="Tokens per item code (levels + 1).")
    titles: list[str]
    codes: list[list[int]] = Field(description="Per title, its code index at each level.")
    vocab_size: int = Field(
        description="Code tokens follow the backbone's vocabulary: level l's code j is "
        "vocab_size + l·codebook + j."
    )
    instruction: list[int] = Field(description="Token ids every history prompt starts with.")
    backbone_fingerprint: str = Field(
        description="Identity of the backbone reading codes (its weights and the code rows): "
        "what features and checkpoints on codes are tied to."
    )
    stats: dict = Field(description="Collision rate, codebook usage per level, build seconds.")


class RecommendOut(BaseModel):
    items: list[RecommendedItem]
    target: str = Field(description="Which trained code target ranked.")
    strategy: str
    k: int
    seconds: float = Field(description="The search's wall time on the cloud.")
    target_passes: int
    acceptance: float | None = Field(None, description="Speculative: drafted steps accepted.")
    cached: bool = Field(
        False,
        description="Answered from the cloud's memory of an identical request; `seconds` "
        "and `target_passes` are the original search's.",
    )


class RecommendSessionIn(RecommendIn):
    """Recommend with the device's own side network on the backbone: a session whose event
    stream asks the device for g(x) once per target pass over the token tree (`tree_request`)
    and ends with the items (`recommended`, then `done`)."""

    setting: Literal["lst", "full", "choice", "spa"] = Field("spa")
    threshold: Finite = Field(0.5, description="σ = 1 where the gate's p(device) ≥ threshold")
    gate: GateIn | None = Field(None, description="Needed by choice and spa.")
    rungs: list[int] | None = Field(None, description="Rungs the side network reads; default L/4.")
    tap_dtype: WireDtype | None = Field(None, description="Precision of taps and g(x).")
    tap_encoding: TapEncoding | None = Field(None, description="How taps cross the wire.")
    deadline_s: Finite | None = Field(None, gt=0, description="How long to wait for g(x).")

    @model_validator(mode="after")
    def _gated(self) -> RecommendSessionIn:
        if self.setting in GATED_SETTINGS and self.gate is None:
            raise ValueError(f"setting {self.setting} needs the device's gate weights (gate)")
        return self
