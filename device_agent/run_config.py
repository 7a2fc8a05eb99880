"""A federated run's config (`[tool.flwr.app.config]`), validated the same way by the ServerApp
and by every ClientApp. Kept light (pydantic only): the ServerApp reads it without loading the
device's torch stack, which costs seconds in every Flower process that starts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from personalization.config import FederatedStrategy
from personalization.errors import ConfigError

if TYPE_CHECKING:
    from flwr.app import Context


class RunConfig(BaseModel):
    """The run's `[tool.flwr.app.config]`, validated once for the server and the devices: a bad
    value is one `ConfigError` naming its key, not a traceback deep in a round."""

    model_config = ConfigDict(
        frozen=True, extra="ignore", alias_generator=lambda name: name.replace("_", "-")
    )

    cloud_url: str
    work_dir: Path
    data: Path
    strategy: FederatedStrategy
    setting: str
    local_epochs: int = Field(ge=1)
    held_out: int = Field(ge=1)
    eval_tokens: int = Field(ge=1)
    eval_k: int = Field(10, ge=1, le=50)
    search_rounds: Literal["every", "last", "none"] = "every"
    calibration_prompts: int = Field(ge=0)
    fail_partition: int
    seed: int
    num_rounds: int = Field(ge=1)
    num_nodes: int = Field(ge=1)
    fraction_train: float = Field(1.0, gt=0, le=1)  # of the available devices, each round
    min_nodes: int = Field(ge=1)
    round_timeout: float = Field(gt=0)
    run_name: str = ""

    @classmethod
    def of(cls, context: Context) -> RunConfig:
        return cls.parse(dict(context.run_config))

    @classmethod
    def parse(cls, values: dict) -> RunConfig:
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            reasons = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5]
            )
            raise ConfigError(f"bad federated run config: {reasons}") from None
