"""The draft of speculative beam search: the backbone's first few layers, sharing its tokenizer.

Speculative decoding needs a draft with the target's vocabulary that is much cheaper per token.
We take the first `layers` decoder layers of the backbone (own copies, trainable) and its final
norm (own copy), and *share* the embeddings and LM head with it (frozen, no extra memory). Such a
draft starts as an early exit of the target — already a rough approximation — and distillation
(`distill`) aligns it further.

Under a catalogue the draft only ever needs logits of the tokens its trie node allows, so its
head is evaluated on those rows alone: with a 49k vocabulary and a two-layer draft, the full head
would otherwise cost more than the layers themselves.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from personalization.atspeed.catalogue import Catalogue, masked_log_softmax
from personalization.backbone.frozen import Backbone, find_layers
from personalization.errors import ConfigError, SpaError
from personalization.files import atomic_path, read_safetensors

FORMAT = "spa-draft/1"


class DraftError(SpaError, ValueError):
    """A draft checkpoint that is missing, damaged or made for another backbone."""


@dataclass(frozen=True, kw_only=True)
class DraftConfig:
    layers: int = 2  # the backbone's first decoder layers the draft keeps

    def __post_init__(self):
        if self.layers < 1:
            raise ConfigError("a draft needs at least one layer")


class Draft:
    """A small causal LM over the backbone's tokenizer: its first layers, final norm and head."""

    def __init__(self, backbone: Backbone, config: DraftConfig | None = None):
        self.config = config or DraftConfig()
        if self.config.layers >= backbone.num_layers:
            raise ConfigError(
                f"a draft of {self.config.layers} layers is no smaller than the "
                f"{backbone.num_layers}-layer backbone"
            )
        self.source = backbone
        self.net = Backbone(
            _truncated(backbone, self.config.layers),
            backbone.tokenizer,
            name=f"{backbone.name}-draft{self.config.layers}",
        )

    def trainable(self) -> dict[str, nn.Parameter]:
        """The draft's own parameters (layers and final norm), not those it shares."""
        shared = {id(p) for p in self.source.model.parameters()}
        return {n: p for n, p in self.net.model.named_parameters() if id(p) not in shared}

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable().values())

    def logprobs(
        self, hidden: Tensor, nodes: Sequence[int], catalogue: Catalogue | None
    ) -> tuple[Tensor, Tensor]:
        """Step log-probabilities from pre-norm hidden states [n, H], as columns [U] and values
        [n, U]: the whole vocabulary without a catalogue, else the union of the nodes' allowed
        tokens (see `catalogue.constrained_logprobs`), the head evaluated on those rows only."""
        normed = self.net.final_norm(hidden)
        if catalogue is None:
            logits = self.net.lm_head(normed).float()
            return torch.arange(logits.shape[-1]), torch.log_softmax(logits, dim=-1)
        return self.allowed_logprobs(normed, nodes, catalogue)

    def allowed_logprobs(
        self, normed: Tensor, nodes: Sequence[int], catalogue: Catalogue
    ) -> tuple[Tensor, Tensor]:
        """The union of the nodes' allowed tokens [U] and log-probabilities over it [n, U]
        (−inf where a node does not allow a token), from normed hidden states; differentiable."""
        allowed = [catalogue.allowed(n) for n in nodes]
        union = sorted({t for a in allowed for t in a})
        column = {t: i for i, t in enumerate(union)}
        cols = torch.tensor(union, dtype=torch.long)
        head = self.net.lm_head
        bias = None if head.bias is None else head.bias[cols]
        logits = catalogue.add_prior(
            F.linear(normed, head.weight[cols], bias).float(), nodes, union
        )
        mask = torch.zeros(len(nodes), len(union), dtype=torch.bool)
        rows = [i for i, a in enumerate(allowed) for _ in a]
        mask[rows, [column[t] for a in allowed for t in a]] = True
        return cols, masked_log_softmax(logits, mask)

    # ---- checkpoints -----------------------------------------------------------------------------
    def save(self, path: str | Path, info: dict | None = None) -> Path:
        """Atomically write the draft's own parameters with what they were made for."""
        path = Path(path)
        meta = {
            "format": FORMAT,
            "draft": json.dumps(asdict(self.config)),
            "backbone": self.source.name,
            "fingerprint": self.source.fingerprint,
            "info": json.dumps(info or {}),
        }
        tensors = {n: p.detach().contiguous() for n, p in self.trainable().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, backbone: Backbone) -> tuple[Draft, dict]:
        """A saved draft on `backbone` and the info saved with it; refuses another backbone's."""
        meta, tensors = read_safetensors(path, DraftError, "draft checkpoint")
        if meta.get("format") != FORMAT:
            raise DraftError(f"{path}: not a draft checkpoint (format {meta.get('format')!r})")
        if meta.get("fingerprint") != backbone.fingerprint:
            raise DraftError(
                f"{path} is a draft for backbone {meta.get('backbone')!r} (weights "
                f"{meta.get('fingerprint')}), not for {backbone.name!r} ({backbone.fingerprint})"
            )
        draft = cls(backbone, DraftConfig(**json.loads(meta["draft"])))
        own = draft.trainable()
        if set(own) != set(tensors):
            raise DraftError(f"{path}: parameters do not match a {draft.config} draft")
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(tensors[name])
        return draft, json.loads(meta["info"])


def _truncated(backbone: Backbone, layers: int) -> nn.Module:
    """A copy of the backbone's model with only its first `layers` decoder layers; embeddings
    and LM head are the backbone's own modules (deepcopy's memo makes it reuse them)."""
    model = backbone.model
    stack = find_layers(model)
    shared = [*stack[layers:], model.get_input_embeddings(), model.get_output_embeddings()]
    draft = copy.deepcopy(model, memo={id(m): m for m in shared})
    del find_layers(draft)[layers:]
    draft.config.num_hidden_layers = layers
    return draft
