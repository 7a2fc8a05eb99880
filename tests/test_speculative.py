"""Speculative beam search on the tiny backbones: exact in strict mode, min(1, p/q) in relaxed
mode, token-tree caches equal to a fresh computation after rollback."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
import torch
from reference import sequence_logits
from text_items import text_catalogue, text_prompt

from personalization.atspeed.beams import beam_search
from personalization.atspeed.catalogue import Catalogue
from personalization.atspeed.draft import Draft, DraftConfig, DraftError
from personalization.atspeed.speculative import (
    SpeculativeConfig,
    TargetTree,
    speculative_beam_search,
)
from personalization.atspeed.tree import TreeLayout
from personalization.backbone.frozen import Backbone
from personalization.backbone.tiny import tiny_backbone
from personalization.config import DecodeConfig, SPAConfig
from personalization.decoding import generate
from personalization.model import SPAModel
from personalization.side import SideCache

WORDS = ["red", "rose", "oil", "olive", "soap", "serum", "cream", "cr", "shampoo", "s"]


def _catalogue(backbone: Backbone, n: int = 60, seed: int = 0) -> Catalogue:
    """Titles sharing prefixes (and some titles prefixes of others), as real catalogues do."""
    rng = random.Random(seed)
    titles = {" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(n)}
    return text_catalogue(backbone, sorted(titles))


def _prompts(backbone: Backbone, n: int) -> list[list[int]]:
    texts = ["what next after rose serum?", "hi", "a longer prompt about olive oil and soap"]
    return [backbone.encode_prompt(t) for t in texts[:n]]


def _randomize(model: SPAModel, seed: int = 0) -> SPAModel:
    """A side network and gate with random weights, so that g(x) ≠ 0 and the gate varies."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (model.side, model.gate):
            for name, p in module.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "norm" in name else 0.0))
    return model


def _same(reference, found) -> None:
    """Sequences identical; scores equal up to float rounding of a different matmul shape."""
    assert [h.ids for h in found] == [h.ids for h in reference]
    for a, b in zip(found, reference, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-5)


def test_beam_search_equals_decoding(tiny: Backbone):
    """The shared step logic is `decoding`'s beam search (itself tested against transformers)."""
    model = SPAModel(tiny, SPAConfig(setting="base"))
    prompt = _prompts(tiny, 1)[0]
    for k, lp, early in [(1, 1.0, False), (3, 0.0, False), (4, 2.0, True)]:
        decode = DecodeConfig(
            strategy="beam", max_new_tokens=12, num_beams=k, length_penalty=lp, early_stopping=early
        )
        generation = generate(model, prompt, decode)
        list(generation)
        expected = [(h.ids, h.score) for h in generation.hypotheses]
        assert [(h.ids, h.score) for h in beam_search(model, prompt, decode).hypotheses] == expected


@pytest.mark.parametrize(
    ("k", "n", "gamma", "batch", "trie", "lp"),
    [
        (1, 1, 2, 1, False, 1.0),
        (2, 4, 3, 3, False, 1.0),
        (3, 3, 1, 2, False, 0.0),
        (4, 8, 4, 3, False, 1.0),
        (1, 2, 3, 3, True, 0.0),
        (3, 3, 2, 1, True, 0.0),
        (3, 6, 4, 3, True, 1.0),
        (5, 8, 3, 2, True, 0.0),
    ],
)
def test_strict_equals_the_targets_own_beam_search(tiny: Backbone, k, n, gamma, batch, trie, lp):
    catalogue = _catalogue(tiny) if trie else None
    steps = catalogue.max_length if trie else 10
    decode = DecodeConfig(strategy="beam", max_new_tokens=steps, num_beams=k, length_penalty=lp)
    model = SPAModel(tiny, SPAConfig(setting="base"))
    prompts = _prompts(tiny, batch)
    spec = SpeculativeConfig(gamma=gamma, draft_beams=n)
    draft = Draft(tiny, DraftConfig(layers=1))
    result = speculative_beam_search(model, draft, prompts, decode, spec, catalogue)
    reference = [beam_search(model, p, decode, catalogue) for p in prompts]
    for ref, found in zip(reference, result.hypotheses, strict=True):
        _same(ref.hypotheses, found)
    stats = result.stats
    assert stats.drafted_steps > 0 and 0 <= stats.accepted_steps <= stats.drafted_steps
    # the same beam search steps; the batch's prompts share every pass
    assert stats.target_steps == sum(r.forward_passes for r in reference)
    assert stats.target_passes <= 1 + max(r.forward_passes for r in reference)
    if trie:
        assert all(
            catalogue.title(catalogue.walk(h.ids)) for hyps in result.hypotheses for h in hyps
        )


@pytest.mark.parametrize("setting", ["spa", "full", "choice"])
def test_strict_with_an_spa_target_scores_the_tree_in_one_device_call(tiny_llama, setting):
    model = _randomize(SPAModel(tiny_llama, SPAConfig(setting=setting, threshold=0.3)), seed=2)
    catalogue = _catalogue(tiny_llama)
    decode = DecodeConfig(
        strategy="beam", max_new_tokens=catalogue.max_length, num_beams=3, length_penalty=0.0
    )
    prompts = _prompts(tiny_llama, 2)
    spec = SpeculativeConfig(gamma=3, draft_beams=5)
    draft = Draft(tiny_llama, DraftConfig(layers=1))
    result = speculative_beam_search(model, draft, prompts, decode, spec, catalogue)
    reference = [beam_search(model, p, decode, catalogue) for p in prompts]
    for ref, found in zip(reference, result.hypotheses, strict=True):
        _same(ref.hypotheses, found)
    # at most one device contact per target pass, however many steps the pass verified
    assert 0 < result.stats.contacts <= result.stats.target_passes < result.stats.target_steps


def _identical_draft() -> tuple[Backbone, Draft]:
    """A 2-layer target whose second layer is the identity: its 1-layer draft computes exactly
    the target's distribution."""
    backbone = tiny_backbone("llama", seed=5)
    layer = backbone.layers[1]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    return backbone, Draft(backbone, DraftConfig(layers=1))


@pytest.mark.parametrize("verify", ["strict", "relaxed"])
def test_a_draft_equal_to_the_target_is_always_accepted(verify):
    backbone, draft = _identical_draft()
    catalogue = _catalogue(backbone, seed=1)
    decode = DecodeConfig(
        strategy="beam", max_new_tokens=catalogue.max_length, num_beams=3, length_penalty=0.0
    )
    model = SPAModel(backbone, SPAConfig(setting="base"))
    prompts = _prompts(backbone, 2)
    spec = SpeculativeConfig(gamma=4, draft_beams=3, verify=verify)
    stats = speculative_beam_search(model, draft, prompts, decode, spec, catalogue).stats
    assert stats.drafted_steps > 0
    assert stats.accepted_steps == stats.drafted_steps
    if verify == "relaxed":
        assert all(ok for _, ok in stats.trials) and all(
            r == pytest.approx(1.0, abs=1e-4) for r, _ in stats.trials
        )
    # up to γ + 1 steps per pass, for both prompts at once
    assert stats.target_passes < stats.target_steps / 2


def test_relaxed_acceptance_follows_min_one_p_over_q(tiny_llama: Backbone):
    """Every drafted candidate is accepted with probability min(1, p/q): across many trials
    (fixed seeds) the acceptances match the predicted rates, overall and per bin."""
    catalogue = _catalogue(tiny_llama)
    decode = DecodeConfig(
        strategy="beam", max_new_tokens=catalogue.max_length, num_beams=3, length_penalty=0.0
    )
    model = SPAModel(tiny_llama, SPAConfig(setting="base"))
    draft = Draft(tiny_llama, DraftConfig(layers=1))
    trials: list[tuple[float, bool]] = []
    for seed in range(10):
        spec = SpeculativeConfig(gamma=3, draft_beams=6, verify="relaxed", seed=seed)
        result = speculative_beam_search(
            model, draft, _prompts(tiny_llama, 3), decode, spec, catalogue
        )
        trials += result.stats.trials
        for hyps in result.hypotheses:  # relaxed output: K distinct catalogue items
            assert len({h.ids for h in hyps}) == len(hyps) == 3
            assert all(catalogue.title(catalogue.walk(h.ids)) for h in hyps)
    partial = [(r, ok) for r, ok in trials if 0.02 < r < 0.98]
    assert len(trials) > 800 and len(partial) > 100  # the test sees real uncertainty
    bins = [(0.0, 0.98), (0.0, 0.35), (0.35, 0.7), (0.7, 0.98), (0.98, 1.01)]
    for low, high in bins:
        chosen = [(r, ok) for r, ok in trials if low <= r < high]
        if len(chosen) < 30:
            continue
        expected = sum(r for r, _ in chosen)
        observed = sum(ok for _, ok in chosen)
        sd = math.sqrt(sum(r * (1 - r) for r, _ in chosen)) + 1e-9
        assert abs(observed - expected) <= 4 * sd + 0.5, (low, high, observed, expected)


def test_relaxed_scores_are_the_targets(tiny_llama: Backbone):
    """Relaxed mode may pick other items than beam search, but scores them by the target."""
    catalogue = _catalogue(tiny_llama)
    decode = DecodeConfig(
        strategy="beam", max_new_tokens=catalogue.max_length, num_beams=4, length_penalty=0.0
    )
    model = SPAModel(tiny_llama, SPAConfig(setting="base"))
    prompt = _prompts(tiny_llama, 1)[0]
    spec = SpeculativeConfig(gamma=2, draft_beams=6, verify="relaxed", seed=3)
    draft = Draft(tiny_llama, DraftConfig(layers=1))
    found = speculative_beam_search(model, draft, [prompt], decode, spec, catalogue).hypotheses[0]
    for hyp in found:
        ids = torch.tensor([prompt + list(hyp.ids)])
        logits = tiny_llama(ids, logits="all").logits[0, len(prompt) - 1 : -1]
        node, total = 0, 0.0
        for row, token in zip(logits, hyp.ids, strict=True):
            allowed = catalogue.allowed(node)
            total += float(torch.log_softmax(row[allowed], -1)[allowed.index(token)])
            node = catalogue.child(node, token)
        assert hyp.score == pytest.approx(total, abs=1e-4)


def test_rollback_leaves_caches_equal_to_a_fresh_computation(tiny_llama: Backbone):
    """Grow a token tree for two prompts of different lengths, keep two paths of each: the
    backbone's and the side network's caches then hold exactly what a fresh pass over prompt +
    path computes, and the next nodes' logits equal a full recomputation."""
    # raw taps: an int8 codec would turn the float noise between a tree pass and a fresh pass
    # into whole quantisation steps, and this test is about the caches
    model = _randomize(SPAModel(tiny_llama, SPAConfig(setting="full", tap_encoding="raw-le")))
    prompts = _prompts(tiny_llama, 3)[1:]
    tree = TargetTree(model, prompts, None)
    grown = [[(5,), (6,), (5, 7), (5, 8), (6, 9), (5, 7, 10)], [(11,), (11, 12), (13,)]]
    tree.extend(grown)
    tree.extend([[(5, 7, 10, 14), (6, 9, 15)], [(11, 12, 16)]])
    kept = [[(5, 7, 10, 14), (6, 9)], [(11, 12, 16), (13,)]]
    tree.keep(kept)
    layout = tree.tree.layout
    for row, paths in enumerate(kept):
        P = len(prompts[row])
        for path in paths:
            ids = torch.tensor([prompts[row] + list(path)])
            fresh = tiny_llama(ids, logits=None, rungs=model.rungs)
            slots = list(range(P)) + [layout.slots[row][path[:k]] for k in range(1, len(path) + 1)]
            for mine, theirs in zip(tree.tree.cache.layers, fresh.cache.layers, strict=True):
                torch.testing.assert_close(
                    mine.keys[row, :, slots], theirs.keys[0], atol=1e-5, rtol=1e-4
                )
                torch.testing.assert_close(
                    mine.values[row, :, slots], theirs.values[0], atol=1e-5, rtol=1e-4
                )
            side = SideCache(len(model.side.blocks))
            model.side(model.wire(fresh.taps, model.side_dtype), side)
            for (k, v), (k2, v2) in zip(tree.side.cache.kv, side.kv, strict=True):
                torch.testing.assert_close(k[row, :, slots], k2[0], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(v[row, :, slots], v2[0], atol=1e-5, rtol=1e-4)
    # nothing but the prompts and the kept paths' ancestors is left
    assert len(layout.slots[0]) == 6 and len(layout.slots[1]) == 4
    children = [[(5, 7, 10, 14, 17), (6, 9, 18)], [(13, 19)]]
    outputs = tree.extend(children)
    for row, paths in enumerate(children):
        for path in paths:
            logits, _ = sequence_logits(model, torch.tensor([prompts[row] + list(path)]))
            torch.testing.assert_close(outputs[row][path], logits[0, -1], atol=1e-4, rtol=1e-4)


def test_tree_layout_masks_ancestors_only():
    layout = TreeLayout([3, 2])
    layout.prefill([[1, 2, 3], [4, 5]])
    ids, positions, mask = layout.grow([[(7,), (7, 8), (9,)], [(6,)]])
    assert ids.tolist() == [[7, 8, 9], [6, 0, 0]]
    assert positions[0].tolist() == [3, 4, 3] and positions[1, 0] == 2
    m = mask[0, 0].int().tolist()
    assert m[0] == [1, 1, 1, 1, 0, 0]  # (7,): prompt + itself
    assert m[1] == [1, 1, 1, 1, 1, 0]  # (7, 8): prompt + (7,) + itself
    assert m[2] == [1, 1, 1, 0, 0, 1]  # (9,): not its sibling
    assert mask[1, 0, 0].int().tolist() == [1, 1, 0, 1, 0, 0]  # row 1's prompt has 2 tokens
    assert layout.missing(0, [(7, 8, 1, 2), (9, 3)]) == [(7, 8, 1), (7, 8, 1, 2), (9, 3)]
    with pytest.raises(ValueError, match="before its parent"):
        layout.grow([[(1, 2)], []])


def test_the_draft_shares_embeddings_and_saves_only_its_own_layers(tiny_llama, tmp_path):
    draft = Draft(tiny_llama, DraftConfig(layers=1))
    assert draft.net.num_layers == 1
    assert draft.net.lm_head.weight is tiny_llama.lm_head.weight
    own = draft.trainable()
    assert own and all(p is not tiny_llama.lm_head.weight for p in own.values())
    with torch.no_grad():
        next(iter(own.values())).add_(1.0)
    path = draft.save(tmp_path / "draft.safetensors", {"method": "atspeed-s"})
    loaded, info = Draft.load(path, tiny_llama)
    assert info == {"method": "atspeed-s"}
    for name, p in loaded.trainable().items():
        torch.testing.assert_close(p, own[name])
    with pytest.raises(DraftError, match="draft for backbone"):
        Draft.load(path, tiny_backbone("llama", seed=9))
    with pytest.raises(ValueError, match="no smaller"):
        Draft(tiny_llama, DraftConfig(layers=2))


def test_speculative_config_checks():
    with pytest.raises(ValueError, match="N ≥ K"):
        SpeculativeConfig(draft_beams=2).beams(3)
    assert SpeculativeConfig().beams(5) == 10
    with pytest.raises(ValueError, match="strict or relaxed"):
        SpeculativeConfig(verify="loose")


SHARED = Path(os.environ.get("SPA_DATA_DIR", Path(__file__).parents[2] / "shared" / "data"))


@pytest.mark.backbone
@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not at {SHARED} (set SPA_DATA_DIR)")
def test_strict_equals_beam_search_on_smollm2_and_the_beauty_catalogue(smollm2: Backbone):
    titles = json.loads((SHARED / "beauty_items.json").read_text(encoding="utf-8"))
    catalogue = text_catalogue(smollm2, titles)
    history = ["Neutrogena Ultra Gentle Daily Cleanser, 12 Ounce", "CeraVe Baby Lotion, 8 Ounce"]
    prompt = text_prompt(smollm2, history)
    decode = DecodeConfig(
        strategy="beam", max_new_tokens=catalogue.max_length, num_beams=3, length_penalty=0.0
    )
    model = SPAModel(smollm2, SPAConfig(setting="base"))
    reference = beam_search(model, prompt, decode, catalogue)
    spec = SpeculativeConfig(gamma=5, draft_beams=3)
    result = speculative_beam_search(model, Draft(smollm2), [prompt], decode, spec, catalogue)
    _same(reference.hypotheses, result.hypotheses[0])
    assert result.stats.target_passes < reference.forward_passes
