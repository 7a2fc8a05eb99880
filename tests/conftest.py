"""Shared fixtures: tiny random backbones (fast, offline) and the real embedded SmolLM2 (marked)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers: one thread each, and
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # so for the servers they start, else four
    # threads spin on two cores (set before torch is imported, which reads it once)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from personalization.backbone.frozen import Backbone  # noqa: E402
from personalization.backbone.loading import load_backbone  # noqa: E402
from personalization.backbone.tiny import ARCHS, tiny_backbone  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with a slow test first, each kept whole (stable otherwise): under `make test`'s two
    workers (--no-loadscope-reorder) they start early instead of ending the run alone."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(scope="session")
def tiny_llama() -> Backbone:
    return tiny_backbone("llama")


@pytest.fixture(scope="session", params=ARCHS)
def tiny(request) -> Backbone:
    """Each tiny architecture in turn (Llama, Qwen2 and GPT-2 families)."""
    return tiny_backbone(request.param)


@pytest.fixture(scope="session")
def smollm2() -> Backbone:
    """The real embedded backbone (converted and cached on first use)."""
    return load_backbone("smollm2")
