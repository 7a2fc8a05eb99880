"""Recommendation on item codes (tiny backbone): the item tokenizer, the coded backbone, one-pass
training, AtSpeed's split and metrics, the content baseline, and search over the code trie."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from personalization.atspeed import split
from personalization.atspeed.baselines import Content
from personalization.atspeed.code_target import (
    CodeRecommender,
    CodeTargetConfig,
    HistoryPrior,
    keep_prior,
    load_code_target,
    train_code_target,
)
from personalization.atspeed.coded import coded_backbone
from personalization.atspeed.codes import CodeConfig, ItemCodes, build_codes, cached_codes, separate
from personalization.atspeed.draft import Draft, DraftConfig
from personalization.atspeed.prompts import UnknownItemError
from personalization.atspeed.recommend import (
    RecommendConfig,
    metrics,
    ndcg_at,
    recall_at,
    recommend,
)
from personalization.atspeed.split import User
from personalization.backbone.frozen import Backbone
from personalization.config import SideConfig, SPAConfig
from personalization.errors import ConfigError
from personalization.model import SPAModel
from personalization.training.checkpoint import describe, save_checkpoint
from personalization.training.features import backbone_features
from personalization.training.train import TrainConfig, side_loss

WORDS = ("rose", "olive", "argan", "shea", "mint", "lip", "eye", "nail", "hair", "face")
WORDS += ("serum", "cream", "oil", "soap", "mask", "gel")
SMALL = CodeConfig(levels=2, codebook=8, dims=8)


@pytest.fixture(scope="module")
def titles() -> list[str]:
    rng = random.Random(0)
    return sorted({" ".join(rng.sample(WORDS, 3)) for _ in range(150)})


@pytest.fixture(scope="module")
def codes(titles) -> ItemCodes:
    return build_codes(titles, SMALL)


@pytest.fixture(scope="module")
def users(titles) -> list[User]:
    rng = random.Random(1)
    return [
        User(
            f"u{i}",
            tuple(rng.sample(titles, 5)),
            tuple(rng.sample(titles, i % 2)),
            tuple(rng.sample(titles, 1 + i % 3)),
        )
        for i in range(24)
    ]


# ---- item codes ----------------------------------------------------------------------------------
def test_codes_are_unique_deterministic_and_cover_the_catalogue(titles, codes):
    assert len(codes) == len(titles) and codes.titles == tuple(titles)
    assert codes.length == SMALL.length == 3
    assert len({tuple(c) for c in codes.codes}) == len(titles)  # unique thanks to the last level
    assert (codes.codes >= 0).all() and (codes.codes < SMALL.codebook).all()
    again = build_codes(list(titles) + [titles[0]], SMALL)  # a duplicate title is one item
    assert np.array_equal(again.codes, codes.codes) and again.fingerprint == codes.fingerprint
    other = build_codes(titles, CodeConfig(levels=2, codebook=8, dims=8, seed=1))
    assert other.fingerprint != codes.fingerprint
    s = codes.stats
    assert s["items"] == len(titles) and len(s["usage"]) == 3
    assert all(1 <= u <= SMALL.codebook for u in s["usage"])
    shared = len(titles) - len({tuple(c) for c in codes.codes[:, :2]})
    assert (shared > 0) == (s["collision_rate"] > 0)
    assert codes.label(0).startswith("<a_") and codes.label(0).count("<") == 3


def test_the_last_level_separates_collisions_in_catalogue_order():
    rq = np.array([[1, 2], [1, 2], [0, 0], [1, 2]])
    assert separate(rq, 4)[:, -1].tolist() == [0, 1, 0, 2]
    with pytest.raises(ConfigError, match="3 items share one code"):
        separate(rq, 2)


def test_codes_are_cached_by_catalogue_and_config(titles, tmp_path, monkeypatch):
    monkeypatch.setenv("SPA_CACHE_DIR", str(tmp_path))
    first = cached_codes(titles, SMALL)
    files = list((tmp_path / "codes").glob("*.json"))
    assert len(files) == 1
    again = cached_codes(titles, SMALL)
    assert np.array_equal(again.codes, first.codes) and again.stats == first.stats
    assert ItemCodes.load(files[0]).fingerprint == first.fingerprint


def test_token_ids_follow_the_vocabulary(codes):
    ids = codes.token_ids(3, 100)
    assert ids == tuple(100 + level * 8 + int(c) for level, c in enumerate(codes.codes[3]))


# ---- the coded backbone --------------------------------------------------------------------------
def test_coded_backbone_shares_the_backbone_and_adds_only_code_tokens(tiny: Backbone, codes):
    coded = coded_backbone(tiny, codes)
    V, n = tiny.vocab_size, codes.num_tokens
    assert coded.vocab_size == V + n and coded.hidden_size == tiny.hidden_size
    assert coded.layers[0] is tiny.layers[0] and coded.final_norm is tiny.final_norm
    assert coded.fingerprint != tiny.fingerprint
    text = torch.tensor([[3, 5, 7]])
    torch.testing.assert_close(coded(text).hidden, tiny(text).hidden)  # text reads as before
    out = coded(torch.tensor([[3, V, V + n - 1]]), logits="all")
    assert torch.isinf(out.logits[..., :V]).all() and torch.isfinite(out.logits[..., V:]).all()
    assert not torch.allclose(out.hidden[0, 1], out.hidden[0, 2])  # codes are distinct inputs


def test_code_rows_carry_the_titles_similarity(tiny_llama, codes):
    """Two first-level codes whose centroids are close get close rows; rows are unit directions
    at the scales the backbone expects."""
    from personalization.atspeed.coded import MAX_LOGIT, code_rows

    inputs, outputs = code_rows(tiny_llama, codes)
    C = codes.config.codebook
    cents = torch.as_tensor(codes.centroids[0])
    sim_lsa = torch.nn.functional.cosine_similarity(cents[:, None], cents[None], dim=-1)
    rows = outputs[: len(cents)]
    sim_rows = torch.nn.functional.cosine_similarity(rows[:, None], rows[None], dim=-1)
    off = ~torch.eye(len(cents), dtype=torch.bool)
    corr = torch.corrcoef(torch.stack([sim_lsa[off], sim_rows[off]]))[0, 1]
    assert corr > 0.9, corr  # the map into H keeps the centroids' geometry
    norm = tiny_llama.final_norm.weight.float().norm()
    torch.testing.assert_close(
        outputs.norm(dim=1), torch.full((outputs.shape[0],), MAX_LOGIT / norm)
    )
    assert inputs.shape == outputs.shape == (codes.num_tokens, tiny_llama.hidden_size)
    assert not torch.allclose(rows[0], outputs[C])  # another level, another row


# ---- one-pass training ---------------------------------------------------------------------------
def random_target(backbone, codes, seed: int, std: float) -> CodeRecommender:
    """A `full` side network with random weights (one that does something) on the codes."""
    rec = CodeRecommender.build(backbone, codes)
    model = SPAModel(
        rec.backbone,
        SPAConfig(setting="full"),
        SideConfig(hidden_size=64, num_layers=2, reduction=4),
    )
    torch.manual_seed(seed)
    for p in model.side.parameters():
        p.data.normal_(0, std)
    return CodeRecommender(codes, rec.backbone, model.eval())


def test_one_pass_gives_the_loss_of_per_window_training(tiny_llama, codes, titles):
    rec = random_target(tiny_llama, codes, seed=0, std=0.2)
    model = rec.model
    items = titles[:5]
    cfg = TrainConfig()

    def loss(example):
        f = backbone_features(rec.backbone, example, model.rungs, torch.float32)
        value, _ = side_loss(model, [f], cfg)
        return float(value.detach()), len(example.target)

    one, n = loss(rec.sequence_example(items, 4))
    windows = [loss(rec.sequence_example(items[: k + 1], 1)) for k in range(1, 5)]
    assert n == 4 * codes.length == sum(m for _, m in windows)
    assert one == pytest.approx(sum(v * m for v, m in windows) / n, rel=1e-4)


def test_training_examples_follow_the_time_split(tiny_llama, codes, users):
    rec = CodeRecommender.build(tiny_llama, codes)
    train = rec.training_examples(users)
    assert len(train) == len(users)
    u = users[0]
    assert train[0].prompt == tuple(rec.prompt(u.history[:1]))
    assert train[0].target == tuple(rec.tokens(u.history[1:]))  # validation/test never train
    valid = rec.validation_examples(users)
    assert len(valid) == sum(1 for u in users if u.valid)
    with pytest.raises(UnknownItemError, match="no such cream"):
        rec.prompt(["no such cream"])


def test_a_device_builds_the_examples_the_target_trains_on(tiny_llama, codes, titles):
    """A device's purchases become the ids of the cloud's own one-pass examples: every
    next-item position of the last ≤ 21 earlier purchases, then the held-out ones after them."""
    from device_agent.purchases import CodeBook

    rec = CodeRecommender.build(tiny_llama, codes)
    book = CodeBook(None, rec.prompts)  # what `fetch` builds from GET /v1/codes
    purchases = list(titles[:30])
    (train,), (valid,) = book.examples(purchases, valid_fraction=0.2)
    assert train == rec.prompts.history_example(purchases[:24])
    assert len(train.target) == 20 * codes.length  # the last 21 earlier purchases, not all 24
    assert valid == rec.prompts.sequence_example(purchases, 6)
    assert book.examples(purchases[:2], valid_fraction=0.2) == (
        [rec.prompts.sequence_example(purchases[:2], 1)],
        [],
    )


def test_a_trained_target_keeps_its_best_epoch_and_its_codes(
    tiny_llama, codes, users, tmp_path, monkeypatch, titles
):
    monkeypatch.setenv("SPA_CACHE_DIR", str(tmp_path))
    cfg = CodeTargetConfig(epochs=3, batch_size=8, reduction=4)
    out = tmp_path / "target.safetensors"
    trained = train_code_target(tiny_llama, codes, users, cfg, out=out, progress=False)
    losses = [e["valid"]["lm"] for e in trained.epochs]
    assert len(losses) == 3 and trained.best_epoch == 1 + losses.index(min(losses))
    rec = load_code_target(out, tiny_llama, codes)
    assert (
        train_code_target(tiny_llama, codes, users, cfg, out=out).best_epoch == trained.best_epoch
    )
    other = build_codes(titles, CodeConfig(levels=2, codebook=8, dims=8, seed=3))
    with pytest.raises(ConfigError, match="item codes"):
        load_code_target(out, tiny_llama, other)
    found = recommend(
        rec.model, rec.catalogue, [rec.prompt(users[0].history)], RecommendConfig(k=5)
    )
    assert len(found.items[0]) == 5 and all(i.title in rec.index for i in found.items[0])


# ---- search over the code trie -------------------------------------------------------------------
@pytest.fixture(scope="module")
def target(tiny_llama, codes) -> CodeRecommender:
    return random_target(tiny_llama, codes, seed=1, std=0.3)


def test_beam_search_yields_only_catalogue_items(target, users):
    prompts = [target.prompt(u.history) for u in users[:3]]
    found = recommend(target.model, target.catalogue, prompts, RecommendConfig(k=10))
    assert target.catalogue.max_length == target.codes.length
    for items in found.items:
        assert len(items) == 10 and len({i.title for i in items}) == 10
        assert all(i.title in target.index for i in items)
        assert [i.score for i in items] == sorted((i.score for i in items), reverse=True)


def test_purchased_items_are_left_out_of_the_trie_not_of_the_search(target, users):
    history = list(users[0].history)
    view = target.catalogue.without(history)
    assert len(view) == len(target.catalogue)  # a view: the trie itself is shared
    leaf_parents = {tuple(target.tokens([t])[:-1]) for t in history}
    for prefix in leaf_parents:  # the purchases' last tokens are no longer allowed
        node = view.walk(prefix)
        last = {target.tokens([t])[-1] for t in history if tuple(target.tokens([t])[:-1]) == prefix}
        assert not last & set(view.allowed(node)) and last <= set(target.catalogue.allowed(node))
    first = target.codes.codes[0][0]  # every item under one first-level code: that code goes
    under = [t for i, t in enumerate(target.codes.titles) if target.codes.codes[i][0] == first]
    token = target.tokens(under[:1])[0]
    assert token in target.catalogue.allowed(0) and token not in target.catalogue.without(
        under
    ).allowed(0)
    for k in (3, 10):
        kept = target.recommend(history, RecommendConfig(k=k), exclude_purchased=False).items[0]
        left = target.recommend(history, RecommendConfig(k=k)).items[0]
        assert len(left) == k and not {i.title for i in left} & set(history)
        assert all(math.isfinite(i.score) for i in left)
        # renormalised among the items left: an item scores at least what it scored before
        before = {i.title: i.score for i in kept}
        assert all(i.score >= before[i.title] - 1e-5 for i in left if i.title in before)


@pytest.mark.parametrize(("k", "gamma", "n"), [(1, 1, 2), (3, 2, 3), (5, 3, 10), (8, 4, 16)])
def test_strict_speculative_search_equals_beam_search_on_codes(target, users, k, gamma, n):
    draft = Draft(target.backbone, DraftConfig(layers=1))
    prompts = [target.prompt(u.history) for u in users[:3]]

    def search(strategy: str):
        config = RecommendConfig(strategy=strategy, k=k, gamma=gamma, draft_beams=n)
        return recommend(target.model, target.catalogue, prompts, config, draft)

    beam = recommend(target.model, target.catalogue, prompts, RecommendConfig(k=k))
    history = users[0].history  # and on a view without one user's purchases
    beam_view = target.recommend(history, RecommendConfig(k=k))
    strict_view = target.recommend(
        history,
        RecommendConfig(strategy="speculative-strict", k=k, gamma=gamma, draft_beams=n),
        draft,
    )
    assert [i.title for i in strict_view.items[0]] == [i.title for i in beam_view.items[0]]
    prior = HistoryPrior(weight=3.0, recent=2)  # a prior changes the items, never the equality
    beam_prior, strict_prior = (
        target.recommend(
            history,
            RecommendConfig(strategy=s, k=k, gamma=gamma, draft_beams=n),
            draft,
            prior=prior,
        ).items[0]
        for s in ("beam", "speculative-strict")
    )
    assert [i.title for i in strict_prior] == [i.title for i in beam_prior]
    strict = search("speculative-strict")
    for b, s in zip(beam.items, strict.items, strict=True):
        assert [i.title for i in s] == [i.title for i in b]
        assert [i.score for i in s] == pytest.approx([i.score for i in b], abs=1e-4)
    assert strict.target_passes <= beam.target_passes
    relaxed = search("speculative-relaxed")
    assert all(len(r) == k and all(i.title in target.index for i in r) for r in relaxed.items)


def test_the_history_prior_lifts_items_sharing_the_last_purchases_code_prefixes(target, users):
    history = list(users[0].history)
    last = target.tokens(history[-1:])
    levels = target.codes.config.levels

    def shared(titles):  # code levels each item shares with the last purchase, summed
        return sum(
            next((n for n in range(levels) if target.tokens([t])[n] != last[n]), levels)
            for t in titles
        )

    k, everything = 5, len(target.codes)
    plain = target.recommend(history, RecommendConfig(k=k)).items[0]
    strong = target.recommend(
        history, RecommendConfig(k=k), prior=HistoryPrior(weight=50.0, recent=1)
    ).items[0]
    assert shared(i.title for i in strong) > shared(i.title for i in plain)
    best = max(shared([t]) for t in target.codes.titles if t not in history)
    assert shared([strong[0].title]) == best  # a weight that large decides by prefix first
    bonus = target.prior_bonus(history, HistoryPrior(weight=2.0, recent=2, decay=0.5))
    assert max(bonus.values()) == 2.0 and len(bonus) <= 2 * levels
    view = target.catalogue.with_prior(bonus)
    assert len(view) == everything and not target.catalogue.add_prior(torch.zeros(1, 4), [0]).any()
    with pytest.raises(ConfigError, match="history prior"):
        HistoryPrior(weight=-1.0)


def test_a_target_keeps_the_prior_chosen_for_it(target, tiny_llama, codes, tmp_path):
    path = tmp_path / "target.safetensors"
    save_checkpoint(path, target.model, describe(target.model, data_hash=codes.fingerprint))
    assert load_code_target(path, tiny_llama, codes).prior == HistoryPrior()
    keep_prior(path, HistoryPrior(weight=1.5, recent=3))
    assert load_code_target(path, tiny_llama, codes).prior == HistoryPrior(weight=1.5, recent=3)


# ---- AtSpeed's split, metrics and the content baseline -------------------------------------------
def test_split_uses_time_not_users():
    u = User("a", tuple(f"h{i}" for i in range(25)), ("v1", "v2"), ("t1", "t2", "t3"))
    none = User("b", ("h0",), (), ("t1",))
    assert split.training_sequences([u, none]) == [u.history, none.history]
    (v,) = split.valid_cases([u, none])  # a user without validation items has no validation case
    assert v.items == u.history[-20:] and v.truth == {"v1", "v2"}
    t, t2 = split.test_cases([u, none])
    assert t.items == (u.history + u.valid)[-20:] and t.items[-1] == "v2"
    assert t.truth == {"t1", "t2", "t3"} and t2.items == ("h0",)


def test_metrics_with_several_true_items_by_hand():
    ranked = ["a", "b", "c", "d", "e"]
    truth = {"b", "e", "z"}
    assert recall_at(ranked, truth, 2) == pytest.approx(1 / 3)
    assert recall_at(ranked, truth, 5) == pytest.approx(2 / 3)
    # DCG = 1/log2(3) + 1/log2(6); the ideal puts min(3, 5) = 3 true items first
    ideal = 1 + 1 / math.log2(3) + 1 / 2
    assert ndcg_at(ranked, truth, 5) == pytest.approx((1 / math.log2(3) + 1 / math.log2(6)) / ideal)
    # K smaller than |truth|: the ideal holds K items
    assert ndcg_at(["b", "e"], truth, 2) == pytest.approx(1.0)
    m = metrics([ranked, ranked], [truth, "a"], 5)
    assert m["recall@5"] == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(ConfigError):
        metrics([ranked], [set()], 5)


def test_content_baseline_ranks_by_title_similarity():
    titles = ["rose serum", "rose oil", "olive soap", "olive oil soap", "mint gel"]
    content = Content(titles, recent=1)
    assert content.recommend(["olive soap"], 2) == ["olive soap", "olive oil soap"]
    skip = Content(titles, recent=1, exclude_seen=True)
    assert skip.recommend(["olive soap"], 1) == ["olive oil soap"]
    assert Content(titles, recent=2).recommend(["rose oil", "olive soap"], 5)[-1] == "mint gel"
    assert content.recommend(["unknown"], 3) == []


def test_a_draft_distils_on_codes(target, users):
    """AtSpeed-S / AtSpeed-R alignment runs on the code trie: the draft's distribution moves
    toward the target's at the code prefixes the target's beam search visits."""
    from personalization.atspeed.distill import DistillConfig, distill, draft_logprobs, teacher_data

    prompts = [target.prompt(u.history[:-1]) for u in users[:6]]
    truths = [target.tokens([u.history[-1]]) for u in users[:6]]
    examples = teacher_data(target.model, prompts, truths, target.catalogue, beams=3)
    assert all(e.truth is not None and len(e.items) == 3 for e in examples)
    draft = Draft(target.backbone, DraftConfig(layers=1))

    def tvd() -> float:
        total = 0.0
        with torch.no_grad():
            for ex in examples:
                cols, logq = draft_logprobs(draft, ex, target.catalogue)
                column = {t: i for i, t in enumerate(cols.tolist())}
                for row, prefix, teacher in zip(logq, ex.prefixes, ex.teacher, strict=True):
                    allowed = target.catalogue.allowed(target.catalogue.walk(prefix))
                    q = row[[column[t] for t in allowed]].exp()
                    total += 0.5 * float((q - teacher.exp()).abs().sum())
        return total

    before = tvd()
    report = distill(
        draft,
        examples,
        target.catalogue,
        DistillConfig(method="atspeed-r", alpha=1.0, epochs=12, lr=1e-2),
    )
    assert report.epochs[-1] < report.epochs[0] and tvd() < before
