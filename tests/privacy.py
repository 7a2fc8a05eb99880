"""Capturing what a device sends, and finding a tensor in it in any form it could be smuggled
(the privacy tests of the device agent and of its OpenAI-compatible front)."""

from __future__ import annotations

import base64
import contextlib
import re

import httpx
import torch


class Recording(httpx.BaseTransport):
    """A real HTTP transport that keeps a copy of every request body the device sends."""

    def __init__(self):
        self.inner, self.sent = httpx.HTTPTransport(), []

    def handle_request(self, request):
        self.sent.append(
            bytes(request.method.encode() + b" " + request.url.raw_path) + b"\n" + request.read()
        )
        return self.inner.handle_request(request)

    def close(self):
        self.inner.close()


def corpus(chunks: list[bytes]) -> bytes:
    """Every byte sent, plus the decoded form of every base64 string inside JSON bodies."""
    out = list(chunks)
    for chunk in chunks:
        for match in re.finditer(rb'"([A-Za-z0-9+/=]{16,})"', chunk):
            with contextlib.suppress(ValueError):
                out.append(base64.b64decode(match.group(1), validate=True))
    return b"\x00".join(out)


def forms(p: torch.Tensor) -> dict[str, bytes]:
    """A parameter tensor as it could be smuggled: fp32, fp16, bf16, int8 (absmax), as text."""
    flat = p.detach().flatten().float()
    scale = flat.abs().max().clamp_min(1e-12) / 127
    return {
        "fp32": flat.numpy().tobytes(),
        "fp16": flat.half().numpy().tobytes(),
        "bf16": flat.bfloat16().view(torch.int16).numpy().tobytes(),
        "int8": (flat / scale).round().to(torch.int8).numpy().tobytes(),
        "text": ",".join(f"{v:.6g}" for v in flat[:8].tolist()).encode(),
    }


def leaks(corpus: bytes, p: torch.Tensor, window: int = 16) -> list[str]:
    """Which forms of `p` appear in the corpus (any `window`-byte slice of their non-trivial
    stretch: the first few values are enough to identify a trained tensor)."""
    found = []
    for form, data in forms(p).items():
        probe = data[:window] if form != "text" else data
        if len(set(probe)) > 2 and probe in corpus:  # skip all-zero / constant probes
            found.append(form)
    return found
