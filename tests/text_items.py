"""Catalogues of text items for search tests: multi-token items of different lengths (each ending
in EOS), which exercise more of beam and speculative search than fixed-length item codes do."""

from __future__ import annotations

from collections.abc import Sequence

from personalization.atspeed.catalogue import Catalogue
from personalization.backbone.frozen import Backbone
from personalization.training.data import encode_target

INSTRUCTION = "A customer bought these products, oldest first. Name the next one."


def text_catalogue(backbone: Backbone, titles: Sequence[str]) -> Catalogue:
    """Every title as the backbone would generate it: its tokens, then EOS (a title listed twice
    is one item)."""
    titles = list(dict.fromkeys(titles))
    return Catalogue((encode_target(backbone, t) for t in titles), titles)


def text_prompt(backbone: Backbone, history: Sequence[str]) -> list[int]:
    """A purchase history as a chat prompt: the instruction, then the titles, oldest first."""
    listing = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(history))
    return backbone.encode_prompt(f"{INSTRUCTION}\n\n{listing}")
