"""Server settings: flags of `spa cloud`, or `SPA_CLOUD_*` environment variables.

Every limit a device can run into lives here, so an operator can read (and `/v1/info` can
report) exactly what the server accepts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from limits import parse_many
from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from personalization.backbone.embedded import cache_dir
from personalization.config import (
    DEFAULT_TAP_ENCODING,
    ComputeDtype,
    TapEncoding,
    TapMode,
    WireDtype,
)


def default_database_url() -> str:
    """An SQLite file next to the cached backbone: records survive restarts, nothing to set up."""
    return f"sqlite:///{cache_dir() / 'cloud.db'}"


class CloudSettings(BaseSettings):
    """What the cloud serves and the limits it enforces (env: `SPA_CLOUD_<NAME>`)."""

    model_config = SettingsConfigDict(
        env_prefix="SPA_CLOUD_", extra="ignore", populate_by_name=True
    )

    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    # SPA_BACKBONE is honoured too, so the cloud and the CLI agree on the default backbone
    backbone: str | None = Field(
        None,
        validation_alias=AliasChoices("backbone", "SPA_CLOUD_BACKBONE", "SPA_BACKBONE"),
        description="The frozen backbone (default: $SPA_BACKBONE, else the embedded smollm2).",
    )
    dtype: ComputeDtype = Field(
        "float32",
        description="Precision the backbone computes in; taps and f(x) on the wire keep "
        "--tap-dtype whatever it is.",
    )
    database_url: str = Field(
        default_factory=default_database_url,
        description="SQLAlchemy URL of the records (devices, sessions).",
    )
    tap_dtype: WireDtype = Field(
        "float16", description="Default precision of taps, g(x) and features in transit."
    )
    tap_encoding: TapEncoding = Field(
        DEFAULT_TAP_ENCODING,
        description="Default encoding of taps in sessions (personalization.codecs).",
    )
    tap_mode: TapMode = Field(
        "pull", description="Default tap mode: pull (on asks), streamed (pushed) or run-ahead."
    )
    max_prompt_tokens: int = Field(1024, ge=1, description="Longer prompts get 413.")
    max_new_tokens: int = Field(256, ge=1, description="A session asking for more gets 422.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies get 413.")
    replica: str | None = Field(
        None,
        pattern=r"^[a-z0-9]{1,8}$",
        description="This replica's name: session ids start with it, so a proxy routes a "
        "session's calls to the replica holding it.",
    )
    max_sessions: int = Field(16, ge=1, description="Sessions open at once; more get 429.")
    max_batch: int = Field(16, ge=1, description="Sequences stepped in one batched pass.")
    prefill_chunk: int = Field(
        128,
        ge=1,
        description="A prompt is prefilled this many tokens per pass, so a long one delays "
        "running sessions by at most one chunk.",
    )
    batch_wait_s: float = Field(
        0.02, ge=0, description="A decoding round waits up to this for the active sessions."
    )
    session_ttl_s: float = Field(300.0, gt=0, description="Idle sessions expire after this.")
    sweep_interval_s: float = Field(5.0, gt=0, description="How often expiry is checked.")
    resume_s: float = Field(
        30.0,
        gt=0,
        description="How long a session waits (paused) for a broken event stream's resume.",
    )
    default_deadline_s: float = Field(
        5.0, gt=0, description="How long the cloud waits for g(x) unless a session says."
    )
    max_deadline_s: float = Field(60.0, gt=0, description="The longest deadline a session gets.")
    features_max_batch: int = Field(16, ge=1, description="Examples per features request (413).")
    features_max_tokens: int = Field(
        1024, ge=2, description="Prompt + target tokens per features example (413)."
    )
    log_level: str = Field("info", description="uvicorn's log level.")
    # ---- access --------------------------------------------------------------------------------
    registration: Literal["open", "closed"] | None = Field(
        None,
        description="Who may register a device: open (anyone) or closed (only with the operator "
        "token). Default: open on a loopback host, closed otherwise.",
    )
    operator_token: SecretStr | None = Field(
        None,
        description="The operator's bearer token: registers devices when registration is "
        "closed, and revokes any device's token.",
    )
    rate_limit: str | None = Field(
        None,
        description="Requests per device, in the limits library's notation (e.g. "
        "'100/second;3000/minute'); more get 429 with Retry-After. 'none': no limit. Default: "
        "none on a loopback host, 100/second otherwise.",
    )
    # ---- recommendation ------------------------------------------------------------------------
    catalogue: Path | None = Field(
        None,
        description="A JSON list of item titles, recommended as item codes (GET /v1/codes) "
        "(none: the recommendation endpoints answer 404).",
    )
    recommend_target: str = Field(
        "default",
        description="The code target that ranks: default (spa train-target's last for this "
        "backbone and catalogue) or a checkpoint.",
    )
    # The target is fixed for the server's life, so (history, strategy, k, gamma) → ranking holds.
    recommend_cache: int = Field(
        4096,
        ge=0,
        description="Recommendations remembered, so a repeated request skips the search (0: off).",
    )
    ssl_certfile: Path | None = Field(None, description="Serve HTTPS with this certificate (PEM).")
    ssl_keyfile: Path | None = Field(None, description="The certificate's private key (PEM).")

    @field_validator("rate_limit")
    @classmethod
    def _parses(cls, value: str | None) -> str | None:
        if value not in (None, "", "none"):
            try:
                parse_many(value)
            except ValueError:
                raise ValueError(
                    f"rate_limit {value!r} is not in the limits notation, e.g. '100/second' or "
                    "'100/second;3000/minute' (or 'none')"
                ) from None
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> CloudSettings:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("TLS needs both ssl_certfile and ssl_keyfile")
        return self

    @property
    def loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1")

    @property
    def registration_policy(self) -> str:
        return self.registration or ("open" if self.loopback else "closed")

    @property
    def rate_limits(self) -> str | None:
        """The per-device limits in force (None: unlimited)."""
        chosen = self.rate_limit or (None if self.loopback else "100/second")
        return None if chosen in (None, "", "none") else chosen

    def limits(self) -> dict[str, float | int]:
        """The limits a device must respect (reported by /v1/info)."""
        return {
            "max_prompt_tokens": self.max_prompt_tokens,
            "max_new_tokens": self.max_new_tokens,
            "max_body_bytes": self.max_body_bytes,
            "max_sessions": self.max_sessions,
            "max_batch": self.max_batch,
            "session_ttl_s": self.session_ttl_s,
            "resume_s": self.resume_s,
            "default_deadline_s": self.default_deadline_s,
            "max_deadline_s": self.max_deadline_s,
            "features_max_batch": self.features_max_batch,
            "features_max_tokens": self.features_max_tokens,
        }
