"""What `spa generate` and `spa recommend` share for speculative beam search (AtSpeed): the draft
model's options, and the draft they resolve to."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

PREFIX = "speculative-"  # of personalization.config.SPECULATIVE_STRATEGIES

DraftCheckpoint = Annotated[
    Path | None,
    typer.Option(
        "--draft",
        help="A draft checkpoint (speculative strategies). Default: the backbone's first "
        "--draft-layers layers, untrained.",
        show_default=False,
    ),
]
DraftLayers = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Layers of an untrained draft. Default: 2 (1 on a 2-layer backbone).",
        show_default=False,
    ),
]
Gamma = Annotated[int, typer.Option(min=0, help="Steps drafted per verification.")]
DraftBeams = Annotated[
    int | None, typer.Option(min=1, help="Draft beams N ≥ K. Default: 2·K.", show_default=False)
]


def load_draft(backbone, path: Path | None, layers: int | None):
    """A trained draft from `path`, else the backbone's first `layers` layers, untrained."""
    from personalization.atspeed.draft import Draft, DraftConfig

    if path is not None:
        return Draft.load(path, backbone)[0]
    return Draft(backbone, DraftConfig(layers=layers or min(2, backbone.num_layers - 1)))
