"""Loading a backbone by spec: the embedded default, a tiny test backbone, a path or a hub id."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import torch
from huggingface_hub import constants
from transformers import AutoModelForCausalLM, AutoTokenizer

from personalization.backbone.embedded import (
    EMBEDDED,
    TINY_PREFIX,
    BackboneNotFoundError,
    prepare_embedded,
)
from personalization.backbone.frozen import Backbone
from personalization.backbone.tiny import ARCHS, tiny_backbone

_HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*(/[\w.-]+)?")


def load_backbone(
    spec: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32
) -> Backbone:
    """Load a backbone by spec: the embedded default, a tiny test backbone, a path or a hub id,
    its weights in `dtype`.

    The spec defaults to the `SPA_BACKBONE` environment variable, then the embedded SmolLM2.
    """
    spec = str(spec or os.environ.get("SPA_BACKBONE") or EMBEDDED)
    if spec.startswith(TINY_PREFIX):
        arch = spec.removeprefix(TINY_PREFIX)
        if arch not in ARCHS:
            names = ", ".join(TINY_PREFIX + a for a in ARCHS)
            raise BackboneNotFoundError(f"unknown tiny backbone {spec!r}: one of {names}")
        return tiny_backbone(arch, dtype=dtype)
    path = prepare_embedded() if spec == EMBEDDED else Path(spec).expanduser()
    if not path.exists() and not _HUB_ID.fullmatch(spec):
        raise BackboneNotFoundError(f"backbone path {spec!r} does not exist")
    if path.exists():
        name = path.name if spec == EMBEDDED else spec
        try:
            return _from_pretrained(str(path), name=name, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise BackboneNotFoundError(
                f"{path} is not a loadable Hugging Face causal LM directory (config.json, weights "
                f"and tokenizer files): {str(exc).splitlines()[0]}"
            ) from None
    try:  # a hub id: the local Hugging Face cache first, the network only if that misses
        return _from_pretrained(spec, name=spec, dtype=dtype, local_files_only=True)
    except (OSError, ValueError):
        pass
    try:
        if not _hub_reachable():
            raise OSError(f"{constants.ENDPOINT} is unreachable")
        return _from_pretrained(spec, name=spec, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise BackboneNotFoundError(
            f"cannot load backbone {spec!r}: it is not a local model directory, not in the Hugging "
            "Face cache, and could not be fetched from the hub (this machine may be offline). Pass "
            f"a local directory with --backbone PATH, or use the embedded default ({EMBEDDED!r}). "
            f"Cause: {str(exc).splitlines()[0]}"
        ) from None


def _hub_reachable() -> bool:
    """One quick probe, so an offline machine fails in seconds, not after a minute of retries."""
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        httpx.head(constants.ENDPOINT, timeout=3.0)
    except httpx.HTTPError:
        return False
    return True


def _from_pretrained(source: str, *, name: str, dtype: torch.dtype, **kwargs) -> Backbone:
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    # transformers builds an empty tokenizer when a directory has none: refuse it here, not
    # at the first prompt
    if len(tokenizer) < 2 or not tokenizer("a")["input_ids"]:
        raise ValueError("no tokenizer in it (tokenizer.json, or the vocabulary files)")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    embeddings = model.get_input_embeddings().num_embeddings
    largest = max(tokenizer.get_vocab().values())
    if largest >= embeddings:
        raise ValueError(
            f"its tokenizer has ids up to {largest}, beyond the model's {embeddings} embeddings"
        )
    return Backbone(model, tokenizer, name=name)
