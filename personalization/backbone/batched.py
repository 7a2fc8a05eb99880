"""One backbone pass for many sequences, each with its own KV cache and position.

`forward_many` is what lets a cloud serve many sessions per decoding step: every request brings
its new token ids [r, T] and its own `DynamicCache` (r rows, its own length); the caches are
left-padded into one batch, the pass runs once with an attention mask and per-row positions,
and each request gets back exactly what `Backbone.forward` would have given it alone — hidden
states, taps at its own rungs — with its own cache extended by the new positions. Requests in
one call share T (decode steps: T = 1); a prefill runs as its own call.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from personalization.backbone.frozen import Backbone, BackboneOutput


@dataclass(eq=False)
class Request:
    """New positions for one sequence group (r rows: a beam search's beams), its cache, rungs."""

    input_ids: Tensor  # [r, T]
    cache: DynamicCache
    rungs: tuple[int, ...] = ()
    logits: bool = False  # also the logits of the last position (one head pass for all rows)


@torch.inference_mode()
def forward_many(backbone: Backbone, requests: Sequence[Request]) -> list[BackboneOutput]:
    """`backbone(ids, cache=..., rungs=..., logits=None)` for every request, in one pass."""
    if len(requests) == 1:  # nothing to batch: the plain pass, bit for bit
        r = requests[0]
        logits = "last" if r.logits else None
        return [backbone(r.input_ids, cache=r.cache, rungs=r.rungs, logits=logits)]
    T = requests[0].input_ids.shape[1]
    if any(r.input_ids.shape[1] != T for r in requests):
        raise ValueError("requests batched together must add the same number of positions")
    lengths = [r.cache.get_seq_length() for r in requests]
    longest = max(lengths)
    rows = [r.input_ids.shape[0] for r in requests]
    merged = DynamicCache(config=backbone.config)
    if longest:
        for layer in range(backbone.num_layers):
            keys, values = [], []
            for r, n in zip(requests, lengths, strict=True):
                pad = longest - n
                k, v = (
                    (r.cache.layers[layer].keys, r.cache.layers[layer].values)
                    if n
                    else (None, None)
                )
                if k is None:  # an empty cache: all padding
                    shape = (r.input_ids.shape[0], *_kv_shape(requests, layer, lengths))
                    k = v = torch.zeros(shape[0], shape[1], 0, shape[2], dtype=backbone.dtype)
                keys.append(F.pad(k, (0, 0, pad, 0)))
                values.append(F.pad(v, (0, 0, pad, 0)))
            merged.update(torch.cat(keys), torch.cat(values), layer)
    mask = torch.zeros(sum(rows), longest + T, dtype=torch.long)
    positions = torch.zeros(sum(rows), T, dtype=torch.long)
    start = 0
    for n, r in zip(lengths, rows, strict=True):
        mask[start : start + r, longest - n :] = 1
        positions[start : start + r] = torch.arange(n, n + T)
        start += r
    union = tuple(sorted({k for r in requests for k in r.rungs}))
    out = backbone(
        torch.cat([r.input_ids for r in requests]),
        cache=merged,
        rungs=union,
        logits=None,
        attention_mask=mask,
        position_ids=positions,
    )
    asking = [i for i, r in enumerate(requests) if r.logits]
    if asking:  # the LM head once, over the last position of every row that asked for it
        starts = list(itertools.accumulate([0, *rows]))
        index = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in asking])
        heads = iter(backbone.head(out.hidden[index, -1:]).split([rows[i] for i in asking]))
    results, start = [], 0
    for r, n in zip(requests, rows, strict=True):
        sl = slice(start, start + n)
        for layer in range(backbone.num_layers):
            new = merged.layers[layer]
            r.cache.update(new.keys[sl, :, -T:], new.values[sl, :, -T:], layer)
        taps = None
        if r.rungs:
            index = torch.tensor([union.index(k) for k in r.rungs])
            taps = out.taps[sl].index_select(2, index)
        logits = next(heads) if r.logits else None
        results.append(
            BackboneOutput(hidden=out.hidden[sl], taps=taps, logits=logits, cache=r.cache)
        )
        start += n
    return results


def _kv_shape(requests: Sequence[Request], layer: int, lengths: Sequence[int]) -> tuple[int, int]:
    """(kv heads, head dim) of a layer, read from any request whose cache is not empty."""
    for r, n in zip(requests, lengths, strict=True):
        if n:
            k = r.cache.layers[layer].keys
            return k.shape[1], k.shape[3]
    raise ValueError("no request has a cache to read the key shape from")
