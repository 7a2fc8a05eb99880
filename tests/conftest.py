"""Shared fixtures: tiny random backbones (fast, offline) and the real embedded SmolLM2 (marked)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from personalization.backbone.frozen import Backbone  # noqa: E402
from personalization.backbone.loading import load_backbone  # noqa: E402
from personalization.backbone.tiny import ARCHS, tiny_backbone  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama() -> Backbone:
    return tiny_backbone("llama")


@pytest.fixture(scope="session", params=ARCHS)
def tiny(request) -> Backbone:
    """Each tiny architecture in turn (Llama family and GPT-2 family)."""
    return tiny_backbone(request.param)


@pytest.fixture(scope="session")
def smollm2() -> Backbone:
    """The real embedded backbone (converted and cached on first use)."""
    return load_backbone("smollm2")
