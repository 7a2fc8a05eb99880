"""Training from cached features, the gate's objective and calibration, checkpoints — on tiny
random backbones."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from reference import sequence_logits

from personalization.backbone.tiny import tiny_backbone
from personalization.config import SETTINGS, DecodeConfig, SideConfig, SPAConfig
from personalization.decoding import generate
from personalization.model import SPAModel
from personalization.training.checkpoint import (
    CheckpointError,
    describe,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from personalization.training.data import Example
from personalization.training.features import FeatureCache, backbone_features, make_cache
from personalization.training.train import (
    TrainConfig,
    calibrate,
    gate_probs,
    make_optimizer,
    threshold_for,
    train,
)

SIGNATURE = "~zq sig~"


def _ids(backbone, text: str) -> tuple[int, ...]:
    return tuple(backbone.tokenizer(text, add_special_tokens=False)["input_ids"])


def _eos(backbone) -> int:
    return backbone.tokenizer.eos_token_id


def signature_examples(backbone, n: int = 16, noise: int = 0, seed: int = 0) -> list[Example]:
    """Prompts of random words; targets = `noise` random tokens + the signature + EOS."""
    rng = random.Random(seed)
    words = ["cat", "sun", "tree", "blue", "fast", "road", "milk", "door"]
    examples = []
    for _ in range(n):
        prompt = backbone.encode_prompt(" ".join(rng.choices(words, k=4)))
        junk = tuple(rng.randrange(3, backbone.vocab_size) for _ in range(noise))
        examples.append(
            Example(tuple(prompt), junk + _ids(backbone, SIGNATURE) + (_eos(backbone),))
        )
    return examples


def side_model(backbone, setting: str = "spa") -> SPAModel:
    side = SideConfig(hidden_size=backbone.hidden_size, num_layers=backbone.num_layers, reduction=2)
    return SPAModel(backbone, SPAConfig(setting=setting), side)


def _snapshot(backbone) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in backbone.model.named_parameters()}


@pytest.fixture
def cache(tiny_llama, tmp_path) -> FeatureCache:
    return make_cache(tiny_llama, side_model(tiny_llama).rungs, root=tmp_path)


# ---- the feature cache --------------------------------------------------------------------------
def test_cached_features_are_the_backbones_own(tiny_llama, cache):
    example = signature_examples(tiny_llama, 1)[0]
    assert cache.ensure([example], progress=False) == 1
    got = cache.get(example)
    out = tiny_llama(torch.tensor([example.ids[:-1]]), rungs=cache.source.rungs, logits="all")
    n = len(example.target)
    assert got.taps.dtype == torch.float16 and got.taps.shape == out.taps[0].shape
    torch.testing.assert_close(got.taps.float(), out.taps[0], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(got.final.float(), out.hidden[0, -n:], atol=2e-3, rtol=1e-3)
    logp = torch.log_softmax(out.logits[0, -n:], -1).gather(
        -1, torch.tensor(example.target)[:, None]
    )
    torch.testing.assert_close(got.base_logprob, logp[:, 0], atol=1e-4, rtol=1e-4)
    assert got.start == len(example.prompt) - 1


def test_second_pass_reuses_the_cache(tiny_llama, tmp_path):
    examples = signature_examples(tiny_llama, 6)
    rungs = side_model(tiny_llama).rungs
    first = make_cache(tiny_llama, rungs, root=tmp_path)
    assert first.ensure(examples, progress=False) == 6
    again = make_cache(tiny_llama, rungs, root=tmp_path)  # a later run: a new cache object
    assert again.ensure(examples, progress=False) == 0
    assert rungs == (2,)
    other_rungs = make_cache(tiny_llama, (1,), root=tmp_path)  # a different key
    assert other_rungs.ensure(examples[:2], progress=False) == 2


def test_feature_files_are_written_atomically(tiny_llama, cache, monkeypatch):
    example = signature_examples(tiny_llama, 1)[0]
    features = backbone_features(tiny_llama, example, cache.source.rungs, torch.float16)

    def crash(tensors, path, **_):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("personalization.training.features.save_file", crash)
    with pytest.raises(OSError):
        cache.put(example, features)
    assert cache.get(example) is None  # nothing half-written is ever read back
    assert not list(cache.dir.rglob("*.tmp"))


# ---- training -----------------------------------------------------------------------------------
def test_backbone_is_untouched_and_gets_no_gradients(tiny_llama, cache):
    before = _snapshot(tiny_llama)
    examples = signature_examples(tiny_llama, 8)
    for setting in ("spa", "full", "lst", "choice"):
        model = side_model(tiny_llama, setting)
        side_before = model.side.up.weight.detach().clone()
        train(model, cache.load(examples), TrainConfig(epochs=2, lr=1e-2), progress=False)
        assert not torch.equal(model.side.up.weight, side_before), setting  # g did learn
    assert all(p.grad is None for p in tiny_llama.model.parameters())
    after = _snapshot(tiny_llama)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("setting", ["lora", "adapter"])
def test_in_layer_baselines_train_their_adapters_only(tiny_llama, setting):
    before = _snapshot(tiny_llama)
    model = SPAModel(tiny_llama, SPAConfig(setting=setting))
    examples = signature_examples(tiny_llama, 8)
    result = train(model, examples, TrainConfig(epochs=3, lr=1e-2), valid=examples, progress=False)
    assert result.epochs[-1]["valid"]["lm"] < result.epochs[0]["valid"]["lm"]
    frozen = [p for n, p in model.adapted.model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    after = _snapshot(tiny_llama)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_side_network_learns_a_planted_signature_and_generates_it(tiny_llama, cache):
    examples = signature_examples(tiny_llama, 16)
    base = SPAModel(tiny_llama, SPAConfig(setting="base"))
    decode = DecodeConfig(max_new_tokens=16)
    prompt = examples[0].prompt
    assert SIGNATURE not in generate_text(base, prompt, decode)
    model = side_model(tiny_llama, "spa")
    train(model, cache.load(examples), TrainConfig(epochs=40, lr=5e-3), progress=False)
    generation = generate(model, prompt, decode)
    tokens = list(generation)
    assert generation.text == SIGNATURE
    assert all(t.branch == "device" for t in tokens[:-1])  # the gate asked for every one of them


def generate_text(model, prompt, decode) -> str:
    generation = generate(model, prompt, decode)
    for _ in generation:
        pass
    return generation.text


def test_gate_fires_on_the_pattern_not_on_noise(tiny_llama, cache):
    """Targets: 8 uniformly random tokens (nobody can predict them) then the signature."""
    examples = signature_examples(tiny_llama, 24, noise=8)
    model = side_model(tiny_llama, "spa")
    features = cache.load(examples)
    # the random backbone is so badly calibrated that even noise is predicted ~0.3 nats better
    # by a side network that merely learns the noise is uniform: ask for a 1-nat gain
    train(model, features, TrainConfig(epochs=30, lr=5e-3, gate_margin=1.0), progress=False)
    p = gate_probs(model, features).view(len(examples), -1)
    noise, pattern = p[:, :8], p[:, 9:-1]  # the signature's first token follows noise: skip it
    assert pattern.mean() > noise.mean() + 0.3
    assert (pattern >= model.config.threshold).float().mean() > 0.9
    assert (noise >= model.config.threshold).float().mean() < 0.2


# ---- calibration --------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_calibrated_usage_meets_the_budget(tiny_llama, cache, target):
    examples = signature_examples(tiny_llama, 24, noise=8)
    model = side_model(tiny_llama, "spa")
    features = cache.load(examples)
    train(model, features[:16], TrainConfig(epochs=5, lr=5e-3, target_usage=target), progress=False)
    result = calibrate(model, features[16:], target, progress=False)
    assert model.config.threshold == result.threshold
    assert abs(result.usage - target) <= 0.05
    prompts = [e.prompt for e in examples[16:]]
    result = calibrate(
        model,
        features[16:],
        target,
        prompts=prompts,
        decode=DecodeConfig(max_new_tokens=12),
        progress=False,
    )
    seen = [
        t.gate_prob for p in prompts for t in generate(model, p, DecodeConfig(max_new_tokens=12))
    ]
    usage = sum(q >= result.threshold for q in seen) / len(seen)
    assert usage == pytest.approx(result.usage)  # the reported usage is the generated one


def test_threshold_for_is_a_quantile():
    probs = torch.linspace(0, 1, 101)
    for usage in (0.1, 0.5, 0.9):
        share = float((probs >= threshold_for(probs, usage)).float().mean())
        assert abs(share - usage) <= 0.011
    assert threshold_for(probs, 1.0) == 0.0


# ---- checkpoints --------------------------------------------------------------------------------
def trained(tiny_llama, cache, setting="spa"):
    model = side_model(tiny_llama, setting)
    optimizer = make_optimizer(model, TrainConfig())
    train(
        model,
        cache.load(signature_examples(tiny_llama, 8)),
        TrainConfig(epochs=2),
        optimizer=optimizer,
        progress=False,
    )
    return model, optimizer


def test_checkpoint_round_trips_exactly(tiny_llama, cache, tmp_path):
    model, optimizer = trained(tiny_llama, cache)
    path = save_checkpoint(tmp_path / "c.safetensors", model, describe(model, epoch=2), optimizer)
    loaded, info, optim = load_checkpoint(path, tiny_llama)
    assert info.spa == model.config and info.side == model.side.config and info.epoch == 2
    for name, p in model.trainable().items():
        assert torch.equal(p, loaded.trainable()[name]), name
    again = make_optimizer(loaded, TrainConfig())
    again.load_state_dict(optim)
    mine, theirs = optimizer.state_dict(), again.state_dict()
    assert mine["param_groups"] == theirs["param_groups"]
    assert mine["state"].keys() == theirs["state"].keys()
    for index, entries in mine["state"].items():
        for key, value in entries.items():
            assert torch.equal(value, theirs["state"][index][key]), (index, key)
    ids = torch.tensor([signature_examples(tiny_llama, 1)[0].ids])
    assert torch.equal(sequence_logits(model, ids)[0], sequence_logits(loaded, ids)[0])


def test_a_resumed_run_trains_as_the_uninterrupted_one(tiny_llama, cache, tmp_path):
    """3 epochs straight == 1 epoch, checkpoint, reload, 2 more: the same shuffles, the same
    optimizer state, so the same weights (paper_tables.py extends 5-epoch cells to 15 this way)."""
    data = cache.load(signature_examples(tiny_llama, 12))
    cfg = TrainConfig(epochs=3, batch_size=4, lr=3e-3)
    torch.manual_seed(0)
    straight = side_model(tiny_llama)
    train(straight, data, cfg, progress=False)

    torch.manual_seed(0)
    first = side_model(tiny_llama)
    optimizer = make_optimizer(first, cfg)
    train(first, data, replace(cfg, epochs=1), optimizer=optimizer, progress=False)
    path = save_checkpoint(tmp_path / "c.safetensors", first, describe(first, epoch=1), optimizer)
    resumed, info, optim = load_checkpoint(path, tiny_llama)
    again = make_optimizer(resumed, cfg)
    again.load_state_dict(optim)
    train(resumed, data, cfg, optimizer=again, start_epoch=info.epoch, progress=False)
    for name, p in straight.trainable().items():
        assert torch.equal(p, resumed.trainable()[name]), name


@pytest.mark.parametrize("setting", ["lora", "adapter", "lst"])
def test_every_trainable_setting_checkpoints(tiny_llama, tmp_path, setting):
    model = SPAModel(tiny_llama, SPAConfig(setting=setting))
    if model.adapted is not None:  # make the adapters non-zero, so the round trip means something
        train(model, signature_examples(tiny_llama, 4), TrainConfig(epochs=1), progress=False)
    path = save_checkpoint(tmp_path / "c.safetensors", model, describe(model))
    loaded, _, _ = load_checkpoint(path, tiny_llama)
    ids = torch.tensor([signature_examples(tiny_llama, 1)[0].ids])
    assert torch.equal(sequence_logits(model, ids)[0], sequence_logits(loaded, ids)[0])


def test_checkpoint_for_another_backbone_is_refused(tiny_llama, cache, tmp_path):
    model, _ = trained(tiny_llama, cache)
    path = save_checkpoint(tmp_path / "c.safetensors", model, describe(model))
    with pytest.raises(CheckpointError, match="was trained on backbone"):
        load_checkpoint(path, tiny_backbone("llama", seed=1))  # same shape, other weights
    with pytest.raises(CheckpointError, match="was trained on backbone"):
        load_checkpoint(path, tiny_backbone("gpt2"))


def test_damaged_or_foreign_files_are_refused(tiny_llama, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_checkpoint(junk)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors", metadata={"format": "x"})
    with pytest.raises(CheckpointError, match="not an SPA checkpoint"):
        read_checkpoint(tmp_path / "other.safetensors")


def test_a_crash_mid_write_keeps_the_previous_checkpoint(tiny_llama, cache, tmp_path, monkeypatch):
    model, _ = trained(tiny_llama, cache)
    path = save_checkpoint(tmp_path / "c.safetensors", model, describe(model, epoch=1))
    before = path.read_bytes()
    assert not list(tmp_path.glob("*.tmp"))

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("personalization.training.checkpoint.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, describe(model, epoch=2))
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))  # the partial file was removed
    assert load_checkpoint(path, tiny_llama)[1].epoch == 1


def test_trainable_parameters_side_by_side(tiny_llama):
    counts = {
        s: SPAModel(tiny_llama, SPAConfig(setting=s)).trainable_parameters() for s in SETTINGS
    }
    assert counts["base"] == 0
    assert counts["lst"] == counts["full"] and counts["spa"] == counts["choice"] > counts["full"]
    assert counts["spa"] - counts["full"] == 2 * tiny_llama.hidden_size + 2  # the gate: H×2 + bias
    assert all(counts[s] > 0 for s in ("lora", "adapter"))
