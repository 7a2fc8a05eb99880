"""SPA's settings, side network, gate and incremental decoding on the tiny backbones."""

from __future__ import annotations

import pytest
import torch
from reference import sequence_logits

from personalization.backbone.frozen import Backbone
from personalization.config import SETTINGS, DecodeConfig, SideConfig, SPAConfig, default_rungs
from personalization.decoding import generate
from personalization.model import SPAModel, Stepper
from personalization.side import SideNetwork, count_parameters

SMOLLM2_PARAMETERS = 134_515_008


def _randomize(model: SPAModel, seed: int = 0, scale: float = 0.3) -> SPAModel:
    """Give every trainable tensor random values, so that g(x) ≠ 0 and the gate varies."""
    g = torch.Generator().manual_seed(seed)
    modules = [model.side, model.gate] + ([model.adapted.model] if model.adapted else [])
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                if model.adapted is None or module is not model.adapted.model or p.requires_grad:
                    p.copy_(
                        torch.randn(p.shape, generator=g) * scale + (1.0 if "norm" in name else 0.0)
                    )
    return model


def _prompt(backbone: Backbone) -> list[int]:
    return backbone.encode_prompt("summarise: the quick brown fox jumps over the lazy dog")


def _ids(generation) -> list[int]:
    return [t.id for t in generation]


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
@pytest.mark.parametrize("setting", ["spa", "full", "choice"])
def test_untrained_side_network_reproduces_base(tiny: Backbone, setting: str, strategy: str):
    decode = DecodeConfig(strategy=strategy, max_new_tokens=10, num_beams=3)
    base = _ids(generate(SPAModel(tiny, SPAConfig(setting="base")), _prompt(tiny), decode))
    # the gate as initialised (closed) and, where g(x) is added rather than chosen, forced open
    for threshold in (0.5, 0.0) if setting != "choice" else (0.5,):
        model = SPAModel(tiny, SPAConfig(setting=setting, threshold=threshold))
        assert _ids(generate(model, _prompt(tiny), decode)) == base


def _threshold_splitting_the_gate(model: SPAModel, ids: torch.Tensor) -> float:
    out = model.backbone(ids, logits=None)
    p = model.gate(model.backbone.final_norm(out.hidden))[0]
    return float(p.detach().median())


@pytest.mark.parametrize("setting", SETTINGS)
def test_incremental_logits_equal_full_recomputation(tiny: Backbone, setting: str):
    model = _randomize(SPAModel(tiny, SPAConfig(setting=setting)))
    prompt = _prompt(tiny)
    reference_ids = torch.tensor([prompt + list(range(40, 52))])
    if setting in ("spa", "choice"):
        threshold = _threshold_splitting_the_gate(model, reference_ids)
        model.config = SPAConfig(setting=setting, threshold=threshold)
    stepper = Stepper(model)
    stepped_logits, stepped_device = [], []
    inputs = torch.tensor([prompt])
    for _ in range(12):
        step = stepper.step(inputs)
        stepped_logits.append(step.logits)
        stepped_device.append(step.device)
        inputs = step.logits.argmax(-1, keepdim=True)
    generated = torch.cat(
        [torch.tensor([prompt])] + [lg.argmax(-1, keepdim=True) for lg in stepped_logits[:-1]], 1
    )
    full_logits, full_sigma = sequence_logits(model, generated)
    n = len(prompt) - 1
    torch.testing.assert_close(
        torch.stack(stepped_logits, 1), full_logits[:, n:], atol=1e-4, rtol=0
    )
    assert torch.equal(torch.stack(stepped_device, 1), full_sigma[:, n:])
    if setting in ("spa", "choice"):
        assert 0 < stepper.books.contacts < 12, "the gate should fire on some steps only"


def test_catch_up_batch_equals_one_position_at_a_time(tiny: Backbone):
    model = _randomize(SPAModel(tiny, SPAConfig(setting="spa")))
    taps = tiny(torch.tensor([_prompt(tiny)]), rungs=model.rungs, logits=None).taps
    batched_cache, single_cache = model.side.new_cache(), model.side.new_cache()
    with torch.no_grad():
        batched = torch.cat(
            [model.side(taps[:, :7], batched_cache), model.side(taps[:, 7:], batched_cache)], 1
        )
        single = torch.cat(
            [model.side(taps[:, t : t + 1], single_cache) for t in range(taps.shape[1])], 1
        )
        whole = model.side(taps)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched, whole, atol=1e-5, rtol=0)
    assert batched_cache.length == single_cache.length == taps.shape[1]


def test_skipped_positions_are_caught_up_in_one_message(tiny_llama: Backbone):
    model = _randomize(SPAModel(tiny_llama, SPAConfig(setting="spa")))
    prompt = _prompt(tiny_llama)
    model.config = SPAConfig(setting="spa", threshold=1.01)  # closed: nothing is sent
    stepper = Stepper(model)
    stepper.step(torch.tensor([prompt]))
    stepper.step(torch.tensor([[50]]))
    assert stepper.books.contacts == 0
    model.config = SPAConfig(
        setting="spa", threshold=0.0
    )  # open: the next step sends everything pending
    stepper.step(torch.tensor([[51]]))
    assert stepper.books.contacts == 1
    assert stepper.books.tap_positions == len(prompt) + 2
    assert stepper.side_cache.length == len(prompt) + 2


def test_threshold_zero_is_full_and_above_one_is_base(tiny: Backbone):
    decode = DecodeConfig(max_new_tokens=12)
    prompt = _prompt(tiny)
    spa = _randomize(SPAModel(tiny, SPAConfig(setting="spa", threshold=0.0)))
    full = SPAModel(tiny, SPAConfig(setting="full"))
    full.load_state_dict(spa.state_dict())
    assert _ids(generate(spa, prompt, decode)) == _ids(generate(full, prompt, decode))
    spa.config = SPAConfig(setting="spa", threshold=1.01)
    closed = generate(spa, prompt, decode)
    assert _ids(closed) == _ids(generate(SPAModel(tiny, SPAConfig(setting="base")), prompt, decode))
    assert closed.books.m == 0 and closed.books.bytes_to_device == 0
    assert {t.branch for t in closed.tokens} == {"cloud"}


def _hf_beam(backbone: Backbone, prompt: list[int], **kwargs):
    out = backbone.model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        **kwargs,
    )
    ids = out.sequences[0, len(prompt) :].tolist()
    pad = backbone.model.generation_config.pad_token_id
    while ids and ids[-1] == pad and pad not in backbone.eos_token_ids:
        ids.pop()
    return ids, float(out.sequences_scores[0])


@pytest.mark.parametrize(
    ("num_beams", "length_penalty", "early_stopping", "eos_bias", "options"),
    [
        (2, 1.0, False, 0.0, {}),
        (3, 1.0, False, 0.0, {}),
        (4, 0.0, False, 3.0, {}),
        (5, 2.0, True, 3.0, {}),
        (4, 1.0, False, 4.0, {}),
        (3, 1.0, False, 0.0, {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2}),
        (4, 1.0, False, 3.0, {"no_repeat_ngram_size": 3}),
    ],
)
def test_beam_search_equals_transformers(
    tiny: Backbone, num_beams, length_penalty, early_stopping, eos_bias, options
):
    eos = next(iter(tiny.eos_token_ids))
    head = tiny.lm_head
    bias = torch.zeros(tiny.vocab_size)
    bias[eos] = eos_bias  # make some beams end early, exercising EOS handling
    head.bias = torch.nn.Parameter(bias, requires_grad=False)
    try:
        prompt = _prompt(tiny)
        n = 12
        expected, expected_score = _hf_beam(
            tiny,
            prompt,
            num_beams=num_beams,
            max_new_tokens=n,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            **options,
        )
        decode = DecodeConfig(
            strategy="beam",
            max_new_tokens=n,
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            **options,
        )
        generation = generate(SPAModel(tiny, SPAConfig(setting="base")), prompt, decode)
        assert _ids(generation) == expected
        assert generation.hypotheses[0].score == pytest.approx(expected_score, abs=1e-4)
    finally:
        head.bias = None


def test_accounting_adds_up(tiny: Backbone):
    model = _randomize(SPAModel(tiny, SPAConfig(setting="spa")))
    prompt = _prompt(tiny)
    model.config = SPAConfig(
        setting="spa", threshold=_threshold_splitting_the_gate(model, torch.tensor([prompt]))
    )
    generation = generate(model, prompt, DecodeConfig(max_new_tokens=16))
    tokens = list(generation)
    books = generation.books
    device = sum(t.branch == "device" for t in tokens)
    assert books.tokens == len(tokens) and books.device_tokens == device
    assert books.m == pytest.approx(device / len(tokens))
    assert books.contacts == device
    R, H = len(model.rungs), tiny.hidden_size
    assert books.bytes_to_device == books.tap_positions * model.tap_bytes  # the codec's bytes
    assert model.tap_bytes == model.codec.bytes_per_position(R, H)
    assert books.bytes_from_device == books.contacts * H * 2
    # every position up to the last contact was sent exactly once
    last_contact = max(i for i, t in enumerate(tokens) if t.branch == "device")
    assert books.tap_positions == len(prompt) + last_contact
    assert all(t.gate_prob is not None and 0 <= t.gate_prob <= 1 for t in tokens)


@pytest.mark.parametrize(
    ("setting", "per_layer"), [("lora", 1), ("adapter", 2), ("full", None), ("lst", None)]
)
def test_contacts_per_token_by_setting(tiny: Backbone, setting: str, per_layer):
    generation = generate(
        SPAModel(tiny, SPAConfig(setting=setting)), _prompt(tiny), DecodeConfig(max_new_tokens=6)
    )
    tokens = list(generation)
    expected = per_layer * tiny.num_layers if per_layer else 1
    assert generation.books.m == expected
    assert {t.branch for t in tokens} == {"device"}


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(tiny_llama: Backbone):
    model = SPAModel(tiny_llama, SPAConfig(setting="base"))
    prompt = _prompt(tiny_llama)
    sample = DecodeConfig(strategy="sample", max_new_tokens=10, temperature=1.5, seed=7)
    assert _ids(generate(model, prompt, sample)) == _ids(generate(model, prompt, sample))
    other = DecodeConfig(strategy="sample", max_new_tokens=10, temperature=1.5, seed=8)
    assert _ids(generate(model, prompt, sample)) != _ids(generate(model, prompt, other))
    nucleus = DecodeConfig(strategy="sample", max_new_tokens=10, top_p=1e-6, seed=1)
    assert _ids(generate(model, prompt, nucleus)) == _ids(
        generate(model, prompt, DecodeConfig(max_new_tokens=10))
    )


def test_default_side_network_is_small_for_smollm2():
    config = SideConfig(hidden_size=576, num_layers=30)
    assert config.rungs == (4, 8, 11, 15, 19, 22, 26, 30) and config.width == 72
    share = count_parameters(SideNetwork(config)) / SMOLLM2_PARAMETERS
    assert share <= 0.01


def test_untrained_side_network_outputs_zero(tiny_llama: Backbone):
    side = SideNetwork(SideConfig(hidden_size=64, num_layers=2))
    taps = torch.randn(2, 5, len(side.config.rungs), 64)
    assert torch.count_nonzero(side(taps)) == 0
    assert torch.allclose(torch.sigmoid(side.ladder), torch.full_like(side.ladder, 0.5))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SPAConfig(setting="magic"), "unknown setting"),
        (lambda: SideConfig(hidden_size=64, num_layers=2, rungs=(3,)), "must lie in 1..2"),
        (lambda: SideConfig(hidden_size=64, num_layers=4, rungs=(2, 1)), "strictly increasing"),
        (lambda: SideConfig(hidden_size=64, num_layers=2, reduction=3), "must divide"),
        (lambda: DecodeConfig(strategy="nucleus"), "unknown strategy"),
        (lambda: DecodeConfig(top_p=0), "top_p"),
        (lambda: DecodeConfig(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_bad_configs_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_default_rungs():
    assert default_rungs(2) == (2,)
    assert default_rungs(30)[-1] == 30 and len(default_rungs(30)) == 8


def test_side_rejects_wrong_tap_shape():
    side = SideNetwork(SideConfig(hidden_size=64, num_layers=2))
    with pytest.raises(ValueError, match="expected"):
        side(torch.randn(1, 3, 4, 64))


def test_empty_prompt_is_refused(tiny_llama: Backbone):
    with pytest.raises(ValueError, match="empty"):
        generate(SPAModel(tiny_llama), [])


@pytest.mark.backbone
def test_untrained_spa_reproduces_base_on_smollm2(smollm2: Backbone):
    prompt = smollm2.encode_prompt("Name three colours.")
    decode = DecodeConfig(max_new_tokens=10)
    base = _ids(generate(SPAModel(smollm2, SPAConfig(setting="base")), prompt, decode))
    spa = generate(SPAModel(smollm2, SPAConfig(setting="spa", threshold=0.0)), prompt, decode)
    assert _ids(spa) == base
    assert spa.books.m == 1.0 and spa.books.tap_positions == len(prompt) + 9


@pytest.mark.parametrize("setting", ["spa", "choice", "full", "lst"])
def test_beam_hypotheses_match_recomputation_with_a_trained_side_network(
    tiny: Backbone, setting: str
):
    """Every finished beam's score and branch labels follow from a full recomputation — which
    only holds if caches and pending taps are reordered with the beams."""
    model = _randomize(SPAModel(tiny, SPAConfig(setting=setting)), seed=3)
    prompt = _prompt(tiny)
    if setting in ("spa", "choice"):
        split = _threshold_splitting_the_gate(model, torch.tensor([prompt + list(range(60, 70))]))
        model.config = SPAConfig(setting=setting, threshold=split)
    decode = DecodeConfig(strategy="beam", max_new_tokens=10, num_beams=4)
    generation = generate(model, prompt, decode)
    list(generation)
    assert len(generation.hypotheses) == 4
    for hyp in generation.hypotheses:
        ids = torch.tensor([prompt + list(hyp.ids)])
        logits, sigma = sequence_logits(model, ids)
        n = len(prompt) - 1
        logprobs = torch.log_softmax(logits[0, n:-1].float(), -1)
        score = logprobs.gather(1, ids[0, n + 1 :, None]).sum() / len(hyp.ids)
        assert hyp.score == pytest.approx(float(score), abs=1e-4)
        branches = ["device" if s else "cloud" for s in sigma[0, n:-1].tolist()]
        assert [label[0] for label in hyp.labels] == branches


def test_beam_search_sends_the_shared_prompt_once(tiny_llama: Backbone):
    model = _randomize(SPAModel(tiny_llama, SPAConfig(setting="full")))
    prompt = _prompt(tiny_llama)
    generation = generate(
        model, prompt, DecodeConfig(strategy="beam", max_new_tokens=6, num_beams=3)
    )
    list(generation)
    books = generation.books
    assert books.m == 1.0  # one round trip per search step serves all beams
    assert books.tap_positions == len(prompt) + 3 * (books.steps - 1)


def test_non_float32_backbone_works_with_a_side_network():
    from personalization.backbone.tiny import byte_tokenizer, tiny_model

    model = tiny_model("llama", vocab_size=259).to(torch.bfloat16)
    backbone = Backbone(model, byte_tokenizer(), name="tiny-bf16")
    decode = DecodeConfig(max_new_tokens=6)
    prompt = _prompt(backbone)
    base = _ids(generate(SPAModel(backbone, SPAConfig(setting="base")), prompt, decode))
    assert (
        _ids(generate(SPAModel(backbone, SPAConfig(setting="spa", threshold=0.0)), prompt, decode))
        == base
    )


def test_a_generation_streams_once(tiny_llama: Backbone):
    generation = generate(SPAModel(tiny_llama), _prompt(tiny_llama), DecodeConfig(max_new_tokens=2))
    list(generation)
    with pytest.raises(RuntimeError, match="streams once"):
        list(generation)


@pytest.mark.parametrize("setting", ["lora", "adapter"])
def test_baseline_adapters_belong_to_the_model(tiny_llama: Backbone, setting: str):
    model = SPAModel(tiny_llama, SPAConfig(setting=setting))
    trainable = [
        n for n, p in model.named_parameters() if p.requires_grad and n.startswith("baseline.")
    ]
    assert trainable and all(("lora_" in n) or ("spa_adapters" in n) for n in trainable)
    assert (
        sum(p.numel() for n, p in model.named_parameters() if n in trainable)
        == model.trainable_parameters()
    )
    assert any(k.startswith("baseline.") for k in model.state_dict())
    assert not any(
        p.requires_grad for p in tiny_llama.model.parameters()
    )  # the shared f stays frozen
