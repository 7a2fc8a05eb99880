"""Tiny random backbones built in memory: fast, offline and deterministic.

Unit tests and integration servers use `tiny-llama`, `tiny-qwen2` and `tiny-gpt2` (2 layers,
H = 64: the three families of decoder our users bring) with a byte-level tokenizer and a ChatML
chat template, so that everything runs in seconds without a download, and two processes building
the same spec and seed get bit-identical weights.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from personalization.backbone.frozen import Backbone
from personalization.errors import ConfigError

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ARCHS = ("llama", "qwen2", "gpt2")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, plus ChatML specials): 259 tokens."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
    )


def tiny_model(
    arch: str = "llama", *, vocab_size: int, seed: int = 0, layers: int = 2
) -> PreTrainedModel:
    """A randomly initialised causal LM with H = 64, seeded independently of global RNG state."""
    eos = SPECIALS.index("<|im_end|>")
    if arch in ("llama", "qwen2"):
        config_cls, cls = (
            (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
        )
        config = config_cls(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            bos_token_id=None,
            eos_token_id=eos,
            pad_token_id=0,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=64,
            n_layer=layers,
            n_head=4,
            n_positions=1024,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=0,
        )
        cls = GPT2LMHeadModel
    else:
        raise ConfigError(f"unknown tiny architecture {arch!r}; choose one of {ARCHS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = 0
    return model.eval()


def tiny_backbone(
    arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Backbone:
    """A tiny backbone; its weights are drawn in float32 and then cast, so every dtype holds
    the same model."""
    tokenizer = byte_tokenizer()
    model = tiny_model(arch, vocab_size=len(tokenizer), seed=seed).to(dtype)
    return Backbone(model, tokenizer, name=f"tiny-{arch}")
