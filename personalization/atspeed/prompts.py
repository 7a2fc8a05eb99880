"""Purchase histories as token ids over item codes: the prompt and the one-pass training example.

The cloud's code target and a device training its own side network on codes build their inputs
here, so both see exactly the same ids: a short instruction (the backbone's tokens), then each
purchase's code tokens, oldest first. A device needs no backbone for it — the instruction's ids,
the vocabulary size and the codes are all public (`GET /v1/codes`).
"""

from __future__ import annotations

from collections.abc import Sequence

from personalization.atspeed.codes import ItemCodes
from personalization.atspeed.split import MAX_ITEMS
from personalization.errors import ConfigError, SpaError
from personalization.training.data import Example

INSTRUCTION = "A shopper's purchases, oldest first, as item codes:"


class UnknownItemError(SpaError, ValueError):
    """A history item the catalogue does not hold."""


class CodePrompts:
    """Titles → code token ids after a vocabulary of `vocab` tokens, prompts and examples."""

    def __init__(self, codes: ItemCodes, vocab: int, instruction: Sequence[int]):
        self.codes, self.vocab, self.instruction = codes, vocab, tuple(instruction)
        self.index = {t: i for i, t in enumerate(codes.titles)}

    def item_ids(self, titles: Sequence[str]) -> list[int]:
        """Catalogue indices of titles, or an error naming the first unknown one."""
        for t in titles:
            if t not in self.index:
                raise UnknownItemError(f"item not in the catalogue: {t!r}")
        return [self.index[t] for t in titles]

    def tokens(self, titles: Sequence[str]) -> list[int]:
        return [tok for i in self.item_ids(titles) for tok in self.codes.token_ids(i, self.vocab)]

    def prompt(self, history: Sequence[str]) -> list[int]:
        """The instruction, then the last ≤ 20 purchases' codes (oldest first)."""
        if not history:
            raise ConfigError("the purchase history is empty")
        return list(self.instruction) + self.tokens(list(history)[-MAX_ITEMS:])

    def sequence_example(self, items: Sequence[str], targets: int) -> Example:
        """One causal pass over `items`: the last `targets` items' codes are the target (each
        predicted from every item before it, exactly what a window ending there would see)."""
        if not 0 < targets < len(items):
            raise ConfigError("a sequence example needs context and at least one target item")
        prompt = self.prompt(items[:-targets])
        return Example(tuple(prompt), tuple(self.tokens(items[-targets:])))

    def history_example(self, purchases: Sequence[str]) -> Example | None:
        """Every next-item position of the last ≤ 21 known purchases in one pass (None when
        fewer than two are known)."""
        items = [t for t in purchases if t in self.index][-(MAX_ITEMS + 1) :]
        return self.sequence_example(items, len(items) - 1) if len(items) >= 2 else None

    def later_example(self, history: Sequence[str], later: Sequence[str]) -> Example | None:
        """The `later` purchases after the last ≤ 20 of `history` (validation), or None."""
        history = [t for t in history if t in self.index][-MAX_ITEMS:]
        later = [t for t in later if t in self.index]
        if not history or not later:
            return None
        return self.sequence_example(history + later, len(later))
