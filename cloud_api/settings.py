"""Server settings: flags of `spa cloud`, or `SPA_CLOUD_*` environment variables.

Every limit a device can run into lives here, so an operator can read (and `/v1/info` can
report) exactly what the server accepts.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from personalization.backbone.embedded import cache_dir
from personalization.config import WireDtype


def default_database_url() -> str:
    """An SQLite file next to the cached backbone: records survive restarts, nothing to set up."""
    return f"sqlite:///{cache_dir() / 'cloud.db'}"


class CloudSettings(BaseSettings):
    """What the cloud serves and the limits it enforces (env: `SPA_CLOUD_<NAME>`)."""

    model_config = SettingsConfigDict(
        env_prefix="SPA_CLOUD_", extra="ignore", populate_by_name=True
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # SPA_BACKBONE is honoured too, so the cloud and the CLI agree on the default backbone
    backbone: str | None = Field(
        None, validation_alias=AliasChoices("backbone", "SPA_CLOUD_BACKBONE", "SPA_BACKBONE")
    )
    database_url: str = Field(default_factory=default_database_url)
    tap_dtype: WireDtype = "float16"  # default precision of taps, g(x) and features in transit
    max_prompt_tokens: int = Field(1024, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)  # any request body; larger → 413
    max_sessions: int = Field(16, ge=1)  # sessions created or running at once; more → 429
    session_ttl_s: float = Field(300.0, gt=0)  # a session idle this long is expired and dropped
    sweep_interval_s: float = Field(5.0, gt=0)  # how often expired sessions are looked for
    default_deadline_s: float = Field(5.0, gt=0)  # how long the cloud waits for g(x) by default
    max_deadline_s: float = Field(60.0, gt=0)
    features_max_batch: int = Field(16, ge=1)  # examples per features request; more → 413
    features_max_tokens: int = Field(1024, ge=2)  # prompt + target tokens per example; more → 413
    log_level: str = "info"

    def limits(self) -> dict[str, float | int]:
        """The limits a device must respect (reported by /v1/info)."""
        return {
            "max_prompt_tokens": self.max_prompt_tokens,
            "max_new_tokens": self.max_new_tokens,
            "max_body_bytes": self.max_body_bytes,
            "max_sessions": self.max_sessions,
            "session_ttl_s": self.session_ttl_s,
            "default_deadline_s": self.default_deadline_s,
            "max_deadline_s": self.max_deadline_s,
            "features_max_batch": self.features_max_batch,
            "features_max_tokens": self.features_max_tokens,
        }
