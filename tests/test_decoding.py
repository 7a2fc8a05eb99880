"""Streaming greedy decoding through the backbone interface matches transformers' `generate`."""

from __future__ import annotations

import pytest
import torch

from personalization.backbone.frozen import Backbone
from personalization.config import DecodeConfig, SPAConfig
from personalization.decoding import Detokenizer, generate
from personalization.model import SPAModel


def greedy(backbone: Backbone, prompt: list[int], max_new_tokens: int):
    model = SPAModel(backbone, SPAConfig(setting="base"))
    return list(generate(model, prompt, DecodeConfig(max_new_tokens=max_new_tokens)))


def _reference(backbone: Backbone, prompt: list[int], n: int, **options) -> list[int]:
    out = backbone.model.generate(
        torch.tensor([prompt]),
        max_new_tokens=n,
        do_sample=False,
        num_beams=1,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        **options,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    "options",
    [
        {"repetition_penalty": 1.8},
        {"no_repeat_ngram_size": 2},
        {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3},
    ],
)
def test_repetition_controls_decode_as_transformers(tiny: Backbone, options: dict):
    """The repetition options change greedy decoding exactly as transformers' own logits
    processors do in `generate` (the tiny random model loops without them)."""
    prompt = tiny.encode_prompt("tell me a story")
    model = SPAModel(tiny, SPAConfig(setting="base"))
    plain = [t.id for t in generate(model, prompt, DecodeConfig(max_new_tokens=24))]
    ids = [t.id for t in generate(model, prompt, DecodeConfig(max_new_tokens=24, **options))]
    assert ids == _reference(tiny, prompt, len(ids), **options)
    assert ids != plain
    n = options.get("no_repeat_ngram_size")
    if n:  # no generated token completes an n-gram seen before (the prompt may repeat itself)
        seq = prompt + ids
        grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
        first_new = len(prompt) - n + 1  # the first n-gram that ends on a generated token
        assert all(g not in grams[:i] for i, g in enumerate(grams) if i >= first_new)


def test_greedy_matches_generate_on_tiny(tiny: Backbone):
    prompt = tiny.encode_prompt("tell me a story")
    ids = [t.id for t in greedy(tiny, prompt, max_new_tokens=12)]
    assert ids == _reference(tiny, prompt, len(ids))
    assert len(ids) == 12 or ids[-1] in tiny.eos_token_ids


@pytest.mark.backbone
def test_greedy_matches_generate_on_smollm2(smollm2: Backbone):
    prompt = smollm2.encode_prompt("What is the capital of France?")
    tokens = list(greedy(smollm2, prompt, max_new_tokens=10))
    assert [t.id for t in tokens] == _reference(smollm2, prompt, 10)
    assert "Paris" in "".join(t.text for t in tokens)


def test_greedy_stops_at_eos(tiny_llama: Backbone):
    # make EOS the argmax everywhere by biasing the LM head for one run
    eos = next(iter(tiny_llama.eos_token_ids))
    bias = torch.zeros(tiny_llama.vocab_size)
    bias[eos] = 1e4
    head = tiny_llama.lm_head
    head.bias = torch.nn.Parameter(bias, requires_grad=False)
    try:
        tokens = list(greedy(tiny_llama, [5, 6, 7], max_new_tokens=5))
    finally:
        head.bias = None
    assert [t.id for t in tokens] == [eos]
    assert tokens[0].text == ""  # special tokens add no text


def test_detokenizer_holds_back_partial_characters(tiny_llama: Backbone):
    detok = Detokenizer(tiny_llama.tokenizer)
    ids = tiny_llama.tokenizer("né€", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6  # byte-level: n, é (2 bytes), € (3 bytes)
    pieces = [detok.push(i) for i in ids]
    assert pieces == ["n", "", "é", "", "", "€"]
    assert "".join(pieces) == "né€"
