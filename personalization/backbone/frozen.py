"""The frozen backbone `f`: one small interface over any Hugging Face causal LM.

Everything else in the project (side network, cloud API, trainer) sees the backbone only through
`Backbone.forward`: token ids in, the final hidden state `f(x)` (before the final norm, so that
`f(x) + σ·g(x)` can be pushed through the backbone's own norm and head), the taps at the requested
rungs, and logits. Architectures are handled generically: the decoder layers, the final norm and
the LM head are found by inspecting the model, and the result is verified against the model's own
logits at load time, so an architecture we cannot decompose fails loudly instead of silently.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jinja2 import TemplateError
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from personalization.errors import SpaError


class UnsupportedBackboneError(SpaError, RuntimeError):
    """A model whose final norm / LM head cannot be separated from the rest."""


@dataclass
class BackboneOutput:
    """One backbone pass over new positions (shapes: B batch, T new positions, R rungs)."""

    hidden: Tensor  # f(x): final hidden state before the final norm, [B, T, H]
    taps: Tensor | None  # residual stream at the requested rungs, [B, T, R, H]
    logits: Tensor | None  # final norm + LM head on the requested positions, [B, T', V]
    cache: DynamicCache


class Backbone:
    """A frozen causal LM decomposed into decoder stack, final norm and LM head.

    Rung `k` (1 ≤ k ≤ L) is the residual stream after decoder layer `k`; it equals
    `output_hidden_states[k]` for k < L. For k = L transformers applies the final norm to its last
    entry; our rung L is taken *before* the norm, so every rung lives in the same space.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.config = model.config
        self.decoder = model.base_model
        # transformers 5.24 renamed the decoder's `past_key_values` to `cache` (the old name goes
        # in 5.40); older 5.x releases only know the old one
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.layers = find_layers(model)
        self.lm_head = model.get_output_embeddings()
        if self.lm_head is None:
            raise UnsupportedBackboneError(f"{name}: the model has no output embeddings (LM head)")
        self.final_norm = _find_final_norm(model, self.layers, self.lm_head)
        self._verify()

    # ---- facts the rest of the project needs -------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.lm_head.in_features

    @property
    def vocab_size(self) -> int:
        return self.lm_head.out_features

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identity of the weights (shapes + a sample of the LM head), whatever the name or path:
        what cached features and checkpoints are keyed by."""
        w = self.lm_head.weight
        sample = w[:: max(1, w.shape[0] // 64), :16].detach().float().cpu().numpy().tobytes()
        shape = f"{self.num_layers}x{self.hidden_size}x{self.vocab_size}".encode()
        return hashlib.sha256(shape + sample).hexdigest()[:16]

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends a generation: the generation config's and the tokenizer's."""
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.config):
            eos = getattr(source, "eos_token_id", None)
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(i for i in ids if 0 <= i < self.vocab_size)

    # ---- text ----------------------------------------------------------------------------------
    def encode_prompt(
        self, text: str, *, system: str | None = None, chat: bool = True
    ) -> list[int]:
        """Token ids of a user prompt, wrapped in the chat template when the backbone has one."""
        if chat and self.chat_template:
            messages = [{"role": "system", "content": system}] if system else []
            return self.encode_chat([*messages, {"role": "user", "content": text}])
        prefix = f"{system}\n\n" if system else ""
        return self.tokenizer(prefix + text, add_special_tokens=True)["input_ids"]

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a conversation ({role, content} turns) in the chat template, ready for
        the assistant's next turn."""
        if not self.chat_template:
            raise ValueError(f"{self.name} has no chat template: send a text prompt instead")
        try:
            ids = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except TemplateError as exc:  # e.g. a template that allows no system turn
            raise ValueError(
                f"{self.name}'s chat template refused the conversation: {exc}"
            ) from None
        return list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ---- compute -------------------------------------------------------------------------------
    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def head(self, hidden: Tensor) -> Tensor:
        """Logits from a (possibly side-adapted) pre-norm hidden state: final norm + LM head."""
        return self.lm_head(self.final_norm(hidden))

    @torch.inference_mode()
    def forward(
        self,
        input_ids: Tensor,
        *,
        cache: DynamicCache | None = None,
        rungs: Sequence[int] = (),
        logits: str | None = "last",
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> BackboneOutput:
        """Run the backbone on new positions, extending `cache` (created when None).

        `logits` is "all", "last" or None: the LM head costs V×H per position, so decoding asks
        only for the last one and feature extraction for none.
        """
        if logits not in ("all", "last", None):
            raise ValueError(f"logits must be 'all', 'last' or None, got {logits!r}")
        for k in rungs:
            if not 1 <= k <= self.num_layers:
                raise ValueError(f"rung {k} is outside 1..{self.num_layers}")
        cache = self.new_cache() if cache is None else cache
        captured: dict[int, Tensor] = {}
        hooks = [
            self.final_norm.register_forward_pre_hook(
                _capture(captured, self.num_layers), with_kwargs=True
            )
        ]
        hooks += [
            self.layers[k].register_forward_pre_hook(_capture(captured, k), with_kwargs=True)
            for k in set(rungs)
            if k < self.num_layers
        ]
        try:
            self.decoder(
                input_ids=input_ids,
                use_cache=True,
                **{self._cache_kwarg: cache},
                attention_mask=attention_mask,
                position_ids=position_ids,
            )
        finally:
            for hook in hooks:
                hook.remove()
        hidden = captured[self.num_layers]
        taps = torch.stack([captured[k] for k in rungs], dim=2) if rungs else None
        out_logits = None
        if logits == "all":
            out_logits = self.head(hidden)
        elif logits == "last":
            out_logits = self.head(hidden[:, -1:])
        return BackboneOutput(hidden=hidden, taps=taps, logits=out_logits, cache=cache)

    __call__ = forward

    def trunk(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """f(x) [B, T, H] with autograd on: for baselines whose trainable parameters sit inside
        the backbone (`lora`, `adapter`); SPA itself never back-propagates through it."""
        captured: dict[int, Tensor] = {}
        hook = self.final_norm.register_forward_pre_hook(
            _capture(captured, self.num_layers), with_kwargs=True
        )
        try:
            self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            hook.remove()
        return captured[self.num_layers]

    def _verify(self) -> None:
        """Check that head(f(x)) reproduces the model's own logits on a short input."""
        ids = torch.arange(1, 6, device=self.lm_head.weight.device)[None] % self.vocab_size
        with torch.inference_mode():
            expected = self.model(input_ids=ids).logits
        got = self.forward(ids, logits="all").logits
        if not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
            raise UnsupportedBackboneError(
                f"{self.name}: final norm + LM head do not reproduce the model's logits "
                "(the architecture post-processes logits in a way SPA cannot combine with)"
            )


def _capture(store: dict[int, Tensor], key: int):
    """A pre-hook recording a module's input hidden state under `key` — only for the pass of the
    thread that registered it: another thread may use the same module meanwhile (a cloud session
    applying the final norm to its own f(x) while the step scheduler runs a pass)."""
    owner = threading.get_ident()

    def hook(_module, args, kwargs):
        if threading.get_ident() == owner:
            store[key] = args[0] if args else kwargs["hidden_states"]

    return hook


def find_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder stack: the ModuleList with one entry per hidden layer."""
    n = model.config.num_hidden_layers
    for module in model.base_model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise UnsupportedBackboneError(f"no list of {n} decoder layers found in {type(model).__name__}")


def _find_final_norm(model: PreTrainedModel, layers: nn.ModuleList, head: nn.Module) -> nn.Module:
    """The last normalisation module that runs outside the decoder layers (traced, not named)."""
    inside = {id(m) for m in layers.modules()} | {id(m) for m in head.modules()}
    candidates = [
        m
        for m in model.base_model.modules()
        if id(m) not in inside and "norm" in type(m).__name__.lower()
    ]
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, *_: order.append(mod)) for m in candidates]
    try:
        with torch.inference_mode():
            model.base_model(
                input_ids=torch.zeros(1, 1, dtype=torch.long, device=head.weight.device)
            )
    finally:
        for hook in hooks:
            hook.remove()
    if not order:
        raise UnsupportedBackboneError(f"no final norm found in {type(model).__name__}")
    return order[-1]
