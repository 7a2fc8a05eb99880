"""The paper's in-layer baselines, `lora` and `adapter`, as adapted copies of the backbone.

Both put trainable parameters inside every backbone layer, so a device holding them must be asked
once (LoRA on the attention projections) or twice (adapters after attention and after the MLP)
per layer per token — which is the communication cost SPA avoids. Both start as exact no-ops
(LoRA's B and the adapters' up-projections are zero), like the side network.
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import TYPE_CHECKING

from torch import Tensor, nn

from personalization.errors import ConfigError

if TYPE_CHECKING:  # annotations only: importing this module stays light
    from personalization.backbone.frozen import Backbone

#: device round trips per layer per token
CONTACTS_PER_LAYER = {"lora": 1, "adapter": 2}


class BottleneckAdapter(nn.Module):
    """x + up(act(down(x))) (Houlsby et al., 2019), with `up` zero-initialised."""

    def __init__(self, hidden_size: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(self.act(self.down(x)))


def lora_backbone(backbone: Backbone, rank: int = 8) -> Backbone:
    """A copy of the backbone with peft LoRA on its attention projections (peft's defaults)."""
    from peft import LoraConfig, get_peft_model  # here: only a lora baseline needs peft

    from personalization.backbone.frozen import Backbone

    with warnings.catch_warnings():  # peft calls a transformers API deprecated for v6
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        model = get_peft_model(
            copy.deepcopy(backbone.model), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0)
        )
    adapted = Backbone(model.base_model.model, backbone.tokenizer, name=f"{backbone.name}+lora")
    for name, p in adapted.model.named_parameters():
        p.requires_grad_("lora_" in name)
    return adapted


def adapter_backbone(backbone: Backbone, reduction: int = 8) -> Backbone:
    """A copy of the backbone with bottleneck adapters after attention and MLP in every layer."""
    from personalization.backbone.frozen import Backbone

    model = copy.deepcopy(backbone.model)
    H = backbone.hidden_size
    adapters = nn.ModuleList()
    for layer in _layers_of(model, backbone):
        for pattern in (r"att", r"mlp|ffn|feed_forward"):
            target = _child_matching(layer, pattern)
            adapter = BottleneckAdapter(H, max(1, H // reduction))
            target.register_forward_hook(_apply(adapter))
            adapters.append(adapter)
    model.spa_adapters = adapters  # registered, so it is saved with the model's state dict
    adapted = Backbone(model, backbone.tokenizer, name=f"{backbone.name}+adapter")
    adapters.requires_grad_(True)
    return adapted


def _layers_of(model: nn.Module, backbone: Backbone) -> nn.ModuleList:
    path = next(n for n, m in backbone.model.named_modules() if m is backbone.layers)
    return model.get_submodule(path)


def _child_matching(layer: nn.Module, pattern: str) -> nn.Module:
    for name, child in layer.named_children():
        if re.search(pattern, name, re.IGNORECASE) or re.search(
            pattern, type(child).__name__, re.I
        ):
            return child
    raise ConfigError(f"no child matching /{pattern}/ in {type(layer).__name__}")


def _apply(adapter: BottleneckAdapter):
    def hook(_module, _args, output):
        if isinstance(output, tuple):
            return (adapter(output[0]), *output[1:])
        return adapter(output)

    return hook


def baseline_parameters(backbone: Backbone, setting: str, rank: int = 8) -> int:
    """Parameters `lora` / `adapter` would train on `backbone`, counted from its module shapes
    (no adapted copy is built) — what the what-if table's "% params" column needs."""
    if setting == "adapter":
        H, b = backbone.hidden_size, max(1, backbone.hidden_size // rank)
        return 2 * backbone.num_layers * (2 * H * b + b + H)
    if setting != "lora":
        raise ConfigError(f"{setting!r} is not an in-layer baseline (lora or adapter)")
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TARGETS

    targets = TARGETS[backbone.config.model_type]
    total = 0
    for name, module in backbone.model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            total += rank * sum(module.weight.shape)  # A: r × in, B: out × r
    return total
