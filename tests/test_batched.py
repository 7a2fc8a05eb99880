"""One backbone pass for many sequences equals each sequence's own pass (tiny backbones)."""

from __future__ import annotations

import pytest
import torch

from personalization.backbone.batched import Request, forward_many


def test_a_batched_step_equals_each_sequence_alone(tiny):
    backbone = tiny
    rungs = (1, backbone.num_layers)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34]]
    alone, batched = [], []
    for ids in prompts:  # two copies of every cache: one to step alone, one to step batched
        for caches in (alone, batched):
            cache = backbone.new_cache()
            backbone(torch.tensor([ids]), cache=cache, rungs=rungs, logits=None)
            caches.append(cache)
    batched[2].reorder_cache(torch.tensor([0, 0]))  # a beam group: two rows, one cache
    alone[2].reorder_cache(torch.tensor([0, 0]))
    steps = [torch.tensor([[40]]), torch.tensor([[41]]), torch.tensor([[42], [43]])]
    pairs = enumerate(zip(steps, batched, strict=True))
    mine = forward_many(backbone, [Request(ids, c, rungs[: i % 2 + 1]) for i, (ids, c) in pairs])
    for i, (ids, cache) in enumerate(zip(steps, alone, strict=True)):
        theirs = backbone(ids, cache=cache, rungs=rungs[: i % 2 + 1], logits=None)
        torch.testing.assert_close(mine[i].hidden, theirs.hidden, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine[i].taps, theirs.taps, atol=1e-5, rtol=1e-4)
        assert batched[i].get_seq_length() == cache.get_seq_length()
        for a, b in zip(batched[i].layers, cache.layers, strict=True):
            torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-4)


def test_requests_of_different_lengths_are_refused(tiny_llama):
    a, b = tiny_llama.new_cache(), tiny_llama.new_cache()
    with pytest.raises(ValueError, match="same number of positions"):
        forward_many(
            tiny_llama, [Request(torch.tensor([[1, 2]]), a), Request(torch.tensor([[3]]), b)]
        )


def test_logits_of_the_last_position_come_from_one_head_pass(tiny_llama):
    caches = [tiny_llama.new_cache() for _ in range(3)]
    for cache, ids in zip(caches, ([1, 2, 3], [4, 5], [6, 7, 8, 9]), strict=True):
        tiny_llama(torch.tensor([ids]), cache=cache, logits=None)
    steps = [torch.tensor([[10]]), torch.tensor([[11]]), torch.tensor([[12]])]
    alone = [
        tiny_llama(ids, cache=c, logits="last").logits
        for ids, c in zip(steps, [_copy(tiny_llama, c) for c in caches], strict=True)
    ]
    asked = [True, False, True]
    out = forward_many(
        tiny_llama, [Request(i, c, logits=a) for i, c, a in zip(steps, caches, asked, strict=True)]
    )
    assert out[1].logits is None
    for k in (0, 2):
        torch.testing.assert_close(out[k].logits, alone[k], atol=1e-5, rtol=1e-4)


def _copy(backbone, cache):
    clone = backbone.new_cache()
    for layer, entry in enumerate(cache.layers):
        clone.update(entry.keys.clone(), entry.values.clone(), layer)
    return clone
