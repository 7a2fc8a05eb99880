"""Decoding for every setting — greedy, sampling, beam search — as a streaming iterator.

`generate(model, prompt_ids, DecodeConfig(...))` returns a `Generation`: iterate it for `Token`s
(id, text piece, branch, gate probability) as they are decided; its `books` fill in live. Greedy and
sampling yield each token at once; beam search yields the winning hypothesis when it is known.
Beam search follows transformers' algorithm (top 2·N candidates, length penalty on the generated
length, the same early-stopping heuristic), so with the side network off it returns exactly what
`model.generate(num_beams=N)` returns — where the model's generation config adds no logits
processors of its own and names the same EOS ids. The repetition controls (repetition penalty,
no-repeat n-gram size) are transformers' own logits processors, applied where `generate` applies
them: to the logits of greedy and sampling, to the log-probabilities of beam search, over the
prompt and the output so far.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from personalization.config import DecodeConfig
from personalization.errors import ConfigError
from personalization.latency import Books
from personalization.model import Device, SPAModel, Step, Stepper

if TYPE_CHECKING:  # annotations only: importing this module stays light
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Token:
    """One generated token, as a device, the UI and the accounting see it."""

    id: int
    text: str  # the text this token adds to the output (may be "" mid-way through a character)
    branch: str = "cloud"  # "cloud", "device" or "fallback" (device asked, deadline missed)
    gate_prob: float | None = None


class Detokenizer:
    """Turns a growing list of ids into text pieces, holding back incomplete UTF-8 characters."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(
            self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece


@dataclass(frozen=True)
class Hypothesis:
    """A finished beam: token ids, per-token (branch, gate prob), and its length-penalised score."""

    ids: tuple[int, ...]
    labels: tuple[tuple[str, float | None], ...]
    score: float


class Generation:
    """A streaming generation; iterate once. `books` and `tokens` fill in as tokens arrive."""

    def __init__(
        self,
        model: SPAModel,
        prompt_ids: Sequence[int],
        config: DecodeConfig,
        device: Device | None = None,
        stream: Callable[[Tensor], None] | None = None,
    ):
        if not prompt_ids:
            raise ConfigError("the prompt is empty")
        self.model = model
        self.prompt = list(prompt_ids)
        self.config = config
        self.stepper = Stepper(model, device, stream)
        self.tokens: list[Token] = []
        self.hypotheses: list[Hypothesis] = []  # beam search: the finished beams, best first
        self._detok = Detokenizer(model.backbone.tokenizer)
        self._eos = model.backbone.eos_token_ids
        self._started = False

    @property
    def books(self) -> Books:
        return self.stepper.books

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)

    def __iter__(self) -> Iterator[Token]:
        if self._started:
            raise RuntimeError("a Generation streams once; call generate() again for a new one")
        self._started = True
        steps = self._beam() if self.config.strategy == "beam" else self._one_by_one()
        for token_id, branch, prob in steps:
            token = Token(token_id, self._detok.push(token_id), branch, prob)
            self.tokens.append(token)
            self.books.tokens += 1
            self.books.device_tokens += branch == "device"
            yield token

    # ---- greedy and sampling -------------------------------------------------------------------
    def _one_by_one(self) -> Iterator[tuple[int, str, float | None]]:
        cfg = self.config
        rng = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
        process = logits_processors(cfg)
        inputs, history = torch.tensor([self.prompt]), list(self.prompt)
        for _ in range(cfg.max_new_tokens):
            step = self.stepper.step(inputs)
            logits = process(history, step.logits[0])
            token_id = (
                int(logits.argmax()) if cfg.strategy == "greedy" else sample(logits, cfg, rng)
            )
            yield token_id, *_label(step, 0)
            if token_id in self._eos:
                return
            inputs = torch.tensor([[token_id]])
            history.append(token_id)

    # ---- beam search ---------------------------------------------------------------------------
    def _beam(self) -> Iterator[tuple[int, str, float | None]]:
        cfg, N = self.config, self.config.num_beams
        step = self.stepper.step(torch.tensor([self.prompt]))
        self.stepper.reorder(torch.zeros(N, dtype=torch.long))  # one prompt, N beams
        step = Step(step.logits.expand(N, -1), step.device.expand(N), _expand(step.p_device, N))
        scores = torch.full((N,), -1e9)
        scores[0] = 0.0  # only the first beam is live at the start
        seqs: list[tuple[int, ...]] = [()] * N
        labels: list[tuple] = [()] * N
        finished: list[Hypothesis] = []
        keep = max(2, 1 + len(self._eos)) * N
        process = logits_processors(cfg)
        for t in range(cfg.max_new_tokens):
            logprobs = torch.log_softmax(step.logits.float(), dim=-1)
            logprobs = process.rows([self.prompt + list(s) for s in seqs], logprobs)
            logprobs = logprobs + scores[:, None]
            V = logprobs.shape[-1]
            top_scores, top_index = torch.topk(logprobs.flatten(), keep)
            beams, token_ids = (top_index // V).tolist(), (top_index % V).tolist()
            last = t + 1 == cfg.max_new_tokens
            hits = [last or tok in self._eos for tok in token_ids]
            step_labels = [_label(step, b) for b in range(N)]
            # finished: only candidates among the first N may enter, as in transformers
            for i in range(N):
                if hits[i]:
                    b = beams[i]
                    finished.append(
                        Hypothesis(
                            seqs[b] + (token_ids[i],),
                            labels[b] + (step_labels[b],),
                            float(top_scores[i]) / (t + 1) ** cfg.length_penalty,
                        )
                    )
            finished = sorted(finished, key=lambda h: -h.score)[:N]
            # running: the best N candidates that did not just finish
            live = [i for i in range(keep) if not hits[i]][:N]
            if len(live) < N or last:
                break
            chosen = [beams[i] for i in live]
            scores = top_scores[live]
            seqs = [seqs[b] + (token_ids[i],) for b, i in zip(chosen, live, strict=True)]
            labels = [labels[b] + (step_labels[b],) for b in chosen]
            best_possible = float(scores[0]) / (t + 1) ** cfg.length_penalty
            improvable = len(finished) < N or best_possible > finished[-1].score
            if not improvable or (cfg.early_stopping and len(finished) == N):
                break
            self.stepper.reorder(torch.tensor(chosen))
            step = self.stepper.step(torch.tensor([[token_ids[i]] for i in live]))
        self.hypotheses = finished
        best = finished[0]
        for token_id, (branch, prob) in zip(best.ids, best.labels, strict=True):
            yield token_id, branch, prob


def generate(
    model: SPAModel,
    prompt_ids: Sequence[int],
    config: DecodeConfig | None = None,
    device: Device | None = None,
    stream: Callable[[Tensor], None] | None = None,
) -> Generation:
    """Stream tokens from `model` for one prompt (see `Generation`); `device` answers side
    requests in place of the in-process side network (a remote device, in the cloud API), and
    `stream`, where given, receives every position's taps as soon as they exist."""
    if stream is not None and (config or DecodeConfig()).strategy == "beam":
        raise ConfigError("streamed taps serve greedy and sampling; beam search pulls its rows")
    return Generation(model, prompt_ids, config or DecodeConfig(), device, stream)


class Processors:
    """Transformers' repetition-control logits processors for one `DecodeConfig` (none: the
    scores pass through untouched)."""

    def __init__(self, processors: list):
        self.processors = processors

    def __bool__(self) -> bool:
        return bool(self.processors)

    def __call__(self, history: Sequence[int], logits: Tensor) -> Tensor:
        """One row: `logits` [V] after `history` (the prompt and the output so far)."""
        return self.rows([history], logits[None])[0] if self.processors else logits

    def rows(self, histories: Sequence[Sequence[int]], scores: Tensor) -> Tensor:
        """Several rows at once (beam search): `scores` [N, V], one history per row."""
        if not self.processors:
            return scores
        ids, scores = torch.tensor([list(h) for h in histories]), scores.float()
        for processor in self.processors:
            scores = processor(ids, scores)
        return scores


def logits_processors(cfg: DecodeConfig) -> Processors:
    """The repetition controls `cfg` asks for, in the order transformers' `generate` applies
    them."""
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    processors: list = []
    if cfg.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    if cfg.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(cfg.no_repeat_ngram_size))
    return Processors(processors)


def _label(step: Step, row: int) -> tuple[str, float | None]:
    prob = None if step.p_device is None else float(step.p_device[row])
    if not bool(step.device[row]):
        return "cloud", prob
    return ("fallback" if step.fallback else "device"), prob


def _expand(x: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if x is None else x.expand(n)


def sample(logits: torch.Tensor, cfg: DecodeConfig, rng: torch.Generator | None) -> int:
    """Temperature and nucleus (top-p) sampling."""
    return int(torch.multinomial(filtered_probs(logits, cfg), 1, generator=rng))


def filtered_probs(logits: torch.Tensor, cfg: DecodeConfig) -> torch.Tensor:
    """The sampling distribution after temperature and top-p (not renormalised: `multinomial`
    does not need it)."""
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > cfg.top_p  # keep the first token always
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return probs
