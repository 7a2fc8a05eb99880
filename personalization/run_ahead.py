"""Run-ahead SPA: the backbone drafts every token without waiting, the device corrects it.

The cloud half is a `Drafter`: it decodes with the backbone's own tokens (greedy, or sampled
from p_base), and for each draft hands out the new positions' taps, the final hidden state f(x)
of the drafted position and the drafted token. It never waits for the device; when a correction
arrives it rolls its KV cache back to the corrected position and continues from the device's
token (the drafts after it are withdrawn).

The device half is `verdict`: from f(x) and its own g(x) it applies its own gate (its weights
never leave the device) and decides the SPA token at the drafted position — greedy: argmax
head(f + σ·g), a correction where that differs from the draft; sampling: the speculative-sampling
rule (accept the draft x with probability min(1, p_spa(x) / p_base(x)), otherwise sample from
norm(max(p_spa − p_base, 0))), which makes the output distributed exactly as SPA sampling.
With σ = 0 the draft always stands. Greedy run-ahead therefore gives the tokens of synchronous
`spa` in strict mode — the device's gate on the f(x) it was sent — without a round trip per
device-shaped token: only a correction costs one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from personalization.config import DecodeConfig
from personalization.decoding import filtered_probs, logits_processors, sample
from personalization.errors import ConfigError
from personalization.model import SPAModel


@dataclass(frozen=True)
class Draft:
    """One drafted token: the new positions' taps [1, t, R, H] (wire-rounded by the session's
    encoding), f(x) [H] at the drafted position, the token and the seconds the step took."""

    index: int  # the token's index in the generated text
    start: int  # the first new position (the prompt's taps come with index 0)
    taps: Tensor
    f: Tensor
    token: int
    cloud_s: float


class Drafter:
    """The backbone's half of a run-ahead session: draft, and roll back on a correction."""

    def __init__(self, model: SPAModel, prompt_ids: Sequence[int], decode: DecodeConfig):
        if decode.strategy not in ("greedy", "sample"):
            raise ConfigError("run-ahead serves greedy and sampling; beam search stays synchronous")
        if model.rungs[-1] != model.backbone.num_layers:
            raise ConfigError("run-ahead needs the last rung L among the taps (f(x) is tapped)")
        self.model, self.decode = model, decode
        self.backbone = model.backbone
        self.cache = self.backbone.new_cache()
        self.prompt = list(prompt_ids)
        self.tokens: list[int] = []  # the drafts still standing, corrected ones included
        self.rng = torch.Generator().manual_seed(decode.seed) if decode.seed is not None else None
        self.process = logits_processors(decode)  # repetition controls, as decoding applies them
        self.withdrawn = 0  # drafted tokens thrown away by corrections

    @property
    def length(self) -> int:
        """Positions in the backbone's cache."""
        return self.cache.get_seq_length()

    @torch.no_grad()
    def step(self) -> Draft:
        """Draft the next token: feed what the cache has not seen (the prompt, or the last
        token), and pick from the backbone's own distribution."""
        started = time.perf_counter()
        ids = self.prompt + self.tokens
        start = self.length
        out = self.backbone(
            torch.tensor([ids[start:]]), cache=self.cache, rungs=self.model.rungs, logits=None
        )
        f = out.hidden[0, -1]
        logits = self.process(ids, self.backbone.head(f))
        token = pick(logits, self.decode, self.rng)
        self.tokens.append(token)
        taps = self.model.wire_taps(out.taps, self.model.side_dtype)
        return Draft(len(self.tokens) - 1, start, taps, f, token, time.perf_counter() - started)

    def correct(self, index: int, token: int) -> int:
        """The device's token at `index` replaces the draft; later drafts are withdrawn and the
        cache is cut back to the positions before it. Returns how many drafts were withdrawn."""
        if not 0 <= index < len(self.tokens):
            raise ConfigError(f"no draft {index} to correct (drafted {len(self.tokens)})")
        withdrawn = len(self.tokens) - index - 1
        self.tokens[index:] = [token]
        keep = len(self.prompt) + index  # positions whose inputs still stand
        if self.length > keep:
            self.cache.crop(keep - self.length)  # a negative count: tokens to remove
        self.withdrawn += withdrawn
        return withdrawn


def pick(logits: Tensor, decode: DecodeConfig, rng: torch.Generator | None) -> int:
    """Greedy argmax, or a sample as synchronous decoding draws it."""
    if decode.strategy == "greedy":
        return int(logits.argmax())
    return sample(logits, decode, rng)


def probabilities(logits: Tensor, decode: DecodeConfig) -> Tensor:
    """The sampling distribution (temperature, top-p), normalised: the rule compares p/q."""
    probs = filtered_probs(logits, decode)
    return probs / probs.sum()


@torch.no_grad()
def verdict(
    model: SPAModel,
    f: Tensor,
    g: Tensor,
    draft: int,
    decode: DecodeConfig,
    rng: torch.Generator | None = None,
    history: Sequence[int] = (),
) -> tuple[int, bool, float]:
    """The device's decision at a drafted position: (SPA token, σ, gate probability). The token
    differs from `draft` only where the device corrects it. `history` (the prompt and the tokens
    before the draft) feeds the repetition controls, where `decode` has any."""
    f = f.float()
    p = float(model.gate_prob(f[None].to(model.side_dtype))[0])
    sigma = p >= model.config.threshold
    if not sigma:
        return draft, False, p
    head, process = model.backbone.head, logits_processors(decode)
    spa_logits = process(history, head(f + g.float().to(f.dtype)))
    if decode.strategy == "greedy":
        return int(spa_logits.argmax()), True, p
    base_logits = process(history, head(f))
    p_spa, p_base = probabilities(spa_logits, decode), probabilities(base_logits, decode)
    return accept_or_resample(p_spa, p_base, draft, rng), True, p


def accept_or_resample(p: Tensor, q: Tensor, draft: int, rng: torch.Generator | None = None) -> int:
    """Speculative sampling: `draft` was drawn from q; keep it with probability min(1, p/q),
    else draw from norm(max(p − q, 0)). The result is distributed as p."""
    u = float(torch.rand((), generator=rng))
    if u * float(q[draft]) <= float(p[draft]):  # u ≤ p / q, without dividing by q
        return draft
    residual = (p - q).clamp(min=0)
    if float(residual.sum()) <= 0:  # p == q: nothing to move
        return draft
    return int(torch.multinomial(residual / residual.sum(), 1, generator=rng))
