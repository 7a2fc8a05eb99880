"""The catalogue constraint: a prefix trie over the items' token sequences (their item codes).

Generative recommendation must only produce items that exist. Every item's tokens (its L code
tokens; any token sequences work, e.g. a title's tokens ending in EOS) are inserted into a trie;
at each decoding step only the children of the beam's trie node are allowed.

The constraint acts on logits, before the softmax (`constrained_logprobs`): a beam's step
log-probabilities are renormalised over the allowed tokens, so an item's score is the model's
log-probability of that item *among catalogue items*, and a token the trie forces (the one child
of its node) costs nothing. transformers' `prefix_allowed_tokens_fn` masks after the softmax
instead, which would charge every item for the model's doubt about tokens the catalogue leaves
no choice over.

A view may also carry a **prior** (`with_prior`): a logit bonus for some trie nodes, added to the
logits of the tokens that lead into them before that renormalisation — a product of experts, so
every step is still a distribution. Beam search, speculative search and the draft all read the
same view, so strict speculative search still returns exactly the beam search's items.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from personalization.errors import ConfigError

ROOT = 0  # the trie node of the empty prefix


class Catalogue:
    """A trie over token sequences (ending in EOS); nodes are ints, `ROOT` is the empty prefix."""

    def __init__(self, sequences: Iterable[Sequence[int]], titles: Sequence[str]):
        self.titles = list(titles)
        self._children: list[dict[int, int]] = [{}]
        self._parent: list[int] = [ROOT]
        self._items: dict[int, int] = {}  # node reached by a whole sequence → its title's index
        self._gone: frozenset[int] = frozenset()  # nodes a `without` view leaves out
        self._prior: dict[int, tuple[int, int, float]] = {}  # node → (parent, token, bonus)
        self.max_length = 0  # tokens of the longest sequence, EOS included
        for index, seq in enumerate(sequences):
            node = ROOT
            for token in seq:
                parent = node
                node = self._children[node].setdefault(token, len(self._children))
                if node == len(self._children):
                    self._children.append({})
                    self._parent.append(parent)
            self._items[node] = index
            self.max_length = max(self.max_length, len(seq))
        if not self._items:
            raise ConfigError("the catalogue is empty")

    def __len__(self) -> int:
        return len(self._items)

    @property
    def num_nodes(self) -> int:
        return len(self._children)

    def allowed(self, node: int) -> list[int]:
        children = self._children[node]
        if not self._gone:
            return list(children)
        return [token for token, child in children.items() if child not in self._gone]

    def without(self, titles: Iterable[str]) -> Catalogue:
        """A view of this trie that never completes these items (a user's own purchases, where
        purchases do not repeat), nor enters a prefix left with no item: K beams still find K
        items. The trie itself is shared, not copied."""
        out = set(titles)
        gone = set(self._gone)
        for leaf, index in self._items.items():
            if self.titles[index] not in out:
                continue
            gone.add(leaf)  # and every ancestor it leaves without a way to an item
            node = self._parent[leaf]
            while node != ROOT and all(c in gone for c in self._children[node].values()):
                gone.add(node)
                node = self._parent[node]
        view = copy.copy(self)
        view._gone = frozenset(gone)
        return view

    def with_prior(self, bonus: Mapping[int, float]) -> Catalogue:
        """A view whose steps add `bonus[node]` to the logit of the token leading into `node`."""
        view = copy.copy(self)
        view._prior = {}
        for node, value in bonus.items():
            parent = self._parent[node]
            token = next(t for t, c in self._children[parent].items() if c == node)
            view._prior[node] = (parent, token, float(value))
        return view

    def add_prior(
        self, logits: Tensor, nodes: Sequence[int], columns: Sequence[int] | None = None
    ) -> Tensor:
        """`logits` [len(nodes), V] (or over `columns`: the token ids its columns stand for)
        with the prior's bonuses added for each node's step; unchanged without a prior."""
        if not self._prior:
            return logits
        where = None if columns is None else {t: i for i, t in enumerate(columns)}
        hits = [
            (row, token if where is None else where[token], value)
            for parent, token, value in self._prior.values()
            for row, node in enumerate(nodes)
            if node == parent and (where is None or token in where)
        ]
        if not hits:
            return logits
        rows, cols, values = zip(*hits, strict=True)
        bonus = torch.zeros_like(logits)
        bonus[list(rows), list(cols)] = torch.tensor(values, dtype=logits.dtype)
        return logits + bonus

    def child(self, node: int, token: int) -> int:
        """The node after `token`; KeyError where the catalogue does not allow it."""
        return self._children[node][token]

    def walk(self, ids: Iterable[int], node: int = ROOT) -> int:
        for token in ids:
            node = self._children[node][token]
        return node

    def title(self, node: int) -> str | None:
        """The title whose whole sequence (EOS included) ends at `node`, if any (−1: none)."""
        index = self._items.get(node)
        return None if index is None else self.titles[index]

    def mask(self, nodes: Sequence[int], vocab_size: int) -> Tensor:
        """[len(nodes), V] bool: which tokens each node allows."""
        allowed = [self.allowed(n) for n in nodes]
        rows = torch.repeat_interleave(
            torch.arange(len(nodes)), torch.tensor([len(a) for a in allowed])
        )
        cols = torch.tensor([t for a in allowed for t in a], dtype=torch.long)
        out = torch.zeros(len(nodes), vocab_size, dtype=torch.bool)
        out[rows, cols] = True
        return out


def constrained_logprobs(
    logits: Tensor, nodes: Sequence[int], catalogue: Catalogue | None
) -> Tensor:
    """Step log-probabilities [n, V] in float32: over the whole vocabulary without a catalogue
    (as `decoding`'s beam search), else renormalised over each node's allowed tokens (−inf
    elsewhere), with the view's prior added first."""
    logits = logits.float()
    if catalogue is None:
        return torch.log_softmax(logits, dim=-1)
    allowed = catalogue.mask(nodes, logits.shape[-1]).to(logits.device)
    return masked_log_softmax(catalogue.add_prior(logits, nodes), allowed)


def masked_log_softmax(logits: Tensor, allowed: Tensor) -> Tensor:
    """log-softmax over the allowed entries of each row, −inf elsewhere (and in a row with
    none allowed: a node whose every item a `without` view left out)."""
    out = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return out.masked_fill(~allowed, float("-inf"))
