"""Token trees in one KV cache: the layout and attention mask of speculative beam search.

Each batch row holds its prompt in slots [0, P) and, after it, nodes of a token tree; a node is
named by its *path*, the generated ids from the prompt to it (`()` is the prompt's last token).
A new node attends to its row's prompt, its ancestors and itself — a 4-D mask handed to the
backbone as-is (transformers uses a 4-D mask unchanged), with position P + depth − 1, so every
node computes exactly what it would at the end of its own linear sequence. Beams of one prompt
thereby share the prompt's keys and values instead of copying them per beam, and a whole drafted
tree is scored in one forward pass.

`TreeCache.keep` cuts the cache back to the prompt and the given paths' ancestors: the rollback
after verification. The layout is rebuilt compactly, so the cache never carries rejected nodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import DynamicCache

from personalization.backbone.frozen import Backbone, BackboneOutput

Path = tuple[int, ...]


class TreeLayout:
    """Which path sits in which slot, per batch row, and the masks that follow from it."""

    def __init__(self, prompt_lengths: Sequence[int]):
        if not prompt_lengths or min(prompt_lengths) < 1:
            raise ValueError("every prompt needs at least one token")
        self.prompt_lengths = list(prompt_lengths)
        self.width = max(prompt_lengths)  # slots in use (the same for every row; rows pad)
        self.slots: list[dict[Path, int]] = [{} for _ in prompt_lengths]

    @property
    def rows(self) -> int:
        return len(self.prompt_lengths)

    def holds(self, row: int, path: Path) -> bool:
        return path == () or path in self.slots[row]

    def missing(self, row: int, paths: Sequence[Path]) -> list[Path]:
        """`paths` and their ancestors that the cache lacks, parents first, each once."""
        out: dict[Path, None] = {}
        for path in paths:
            chain = []
            while not self.holds(row, path) and path not in out:
                chain.append(path)
                path = path[:-1]
            out.update(dict.fromkeys(reversed(chain)))
        return list(out)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded prompt ids, positions and causal mask [B, 1, W, W] (padding: itself)."""
        W = self.width
        ids = torch.zeros(self.rows, W, dtype=torch.long)
        mask = torch.eye(W, dtype=torch.bool).repeat(self.rows, 1, 1)
        causal = torch.ones(W, W, dtype=torch.bool).tril()
        for row, prompt in enumerate(prompts):
            P = len(prompt)
            ids[row, :P] = torch.tensor(list(prompt))
            mask[row, :P, :P] = causal[:P, :P]
        positions = torch.arange(W).expand(self.rows, W)
        return ids, positions, mask[:, None]

    def grow(self, nodes: Sequence[Sequence[Path]]) -> tuple[Tensor, Tensor, Tensor]:
        """Ids, positions and mask [B, 1, T, S + T] of new nodes (rows padded to the longest);
        registers them. A node's parent must be held, or come earlier in its row's list."""
        if len(nodes) != self.rows:
            raise ValueError(f"{len(nodes)} rows of nodes for {self.rows} rows")
        S, T = self.width, max(len(row) for row in nodes)
        ids = torch.zeros(self.rows, T, dtype=torch.long)
        positions = torch.zeros(self.rows, T, dtype=torch.long)
        mask = torch.zeros(self.rows, T, S + T, dtype=torch.bool)
        mask[:, :, S:] = torch.eye(T, dtype=torch.bool)
        for row, paths in enumerate(nodes):
            P, slots = self.prompt_lengths[row], self.slots[row]
            mask[row, : len(paths), :P] = True
            for i, path in enumerate(paths):
                if not path or path in slots:
                    raise ValueError(f"node {path} is the root or already held")
                slots[path] = S + i
                ancestors = [slots.get(path[:k]) for k in range(1, len(path))]
                if None in ancestors:
                    raise ValueError(f"node {path} comes before its parent")
                mask[row, i, ancestors] = True
                ids[row, i] = path[-1]
                positions[row, i] = P + len(path) - 1
        self.width = S + T
        return ids, positions, mask[:, None]

    def keep(self, paths: Sequence[Sequence[Path]]) -> Tensor:
        """Keep each row's prompt and the held ancestors of `paths` (themselves included);
        returns the slot index [B, W'] every KV store must gather with."""
        kept: list[list[int]] = []
        for row, row_paths in enumerate(paths):
            slots = self.slots[row]
            wanted = {p[:k] for p in row_paths for k in range(1, len(p) + 1)}
            nodes = sorted((slots[p], p) for p in wanted if p in slots)  # parents before children
            P = self.prompt_lengths[row]
            self.slots[row] = {p: P + i for i, (_, p) in enumerate(nodes)}
            kept.append(list(range(P)) + [s for s, _ in nodes])
        self.width = max(len(k) for k in kept)
        index = torch.arange(self.width).repeat(self.rows, 1)  # padding keeps its own slot
        for row, k in enumerate(kept):
            index[row, : len(k)] = torch.tensor(k)
        return index


@torch.inference_mode()
def gather_slots(x: Tensor, index: Tensor) -> Tensor:
    """Select slots [B, W'] along dim 2 of a [B, heads, S, d] key or value tensor.

    Kept slots are a sorted subset, so index[b, j] ≥ j: the leading columns every row keeps in
    place (the prompts) are not copied; the rest is gathered and written over them in place."""
    B, H, _, D = x.shape
    same = (index == torch.arange(index.shape[1])).all(0)
    start = int(same.long().cumprod(0).sum())
    if start < index.shape[1]:
        tail = index[:, None, start:, None].expand(B, H, index.shape[1] - start, D)
        x[:, :, start : index.shape[1]] = x.gather(2, tail.to(x.device))
    return x[:, :, : index.shape[1]]


def additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean attention mask as the additive float mask every attention implementation takes."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


class TreeCache:
    """A backbone's KV cache over a `TreeLayout`: prefill the prompts, grow nodes, keep paths."""

    def __init__(
        self, backbone: Backbone, prompts: Sequence[Sequence[int]], rungs: Sequence[int] = ()
    ):
        self.backbone = backbone
        self.rungs = tuple(rungs)
        self.layout = TreeLayout([len(p) for p in prompts])
        self.cache: DynamicCache = backbone.new_cache()
        self.prompt_lengths = self.layout.prompt_lengths

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[BackboneOutput, Tensor]:
        """The prompts' pass; returns it with its boolean mask (for a side network to reuse)."""
        return self._run(*self.layout.prefill(prompts))

    def grow(self, nodes: Sequence[Sequence[Path]]) -> tuple[BackboneOutput, Tensor]:
        return self._run(*self.layout.grow(nodes))

    def keep(self, paths: Sequence[Sequence[Path]]) -> Tensor:
        index = self.layout.keep(paths)
        for layer in self.cache.layers:
            layer.keys = gather_slots(layer.keys, index)
            layer.values = gather_slots(layer.values, index)
        return index

    def _run(self, ids: Tensor, positions: Tensor, mask: Tensor) -> tuple[BackboneOutput, Tensor]:
        out = self.backbone(
            ids,
            cache=self.cache,
            rungs=self.rungs,
            logits=None,
            attention_mask=additive(mask, self.backbone.dtype),
            position_ids=positions,
        )
        return out, mask
