"""How the device takes part in a session, one class per tap mode (docs/protocol.md):

- `Pull`: taps ride on each side request; g(x) is computed when asked (catching up on the
  positions not seen yet; a late answer's positions are cropped away again).
- `Streamed`: taps arrive as they exist and g(x) is computed then, off the critical path; a side
  request finds it ready.
- `RunAhead`: the backbone drafts without waiting; the device decides each draft with its own
  gate and side network, accepting it or posting a correction.

Each turns the session's events into the tokens shown, with their share of the bill; its state
is its own. `RemoteGeneration` opens the session, reads the events and owns the totals.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from device_agent.books import Accounts, Pending, TokenCost
from device_agent.client import CloudClient
from device_agent.errors import DeviceError
from personalization.config import DecodeConfig
from personalization.model import SPAModel
from personalization.run_ahead import verdict
from protocol.events import (
    CorrectedEvent,
    DraftEvent,
    Event,
    SideRequestEvent,
    StartEvent,
    TapsEvent,
    TokenEvent,
)
from protocol.messages import SessionOut, VerdictIn


class Generation(Protocol):
    """What a mode reads of the generation it serves (`RemoteGeneration`)."""

    client: CloudClient
    model: SPAModel | None
    decode: DecodeConfig
    strict: bool
    session: SessionOut | None
    accounts: Accounts
    tokens: list[TokenCost]


class Pull:
    """Taps on request: answer each side request with g(x) of its last position."""

    def __init__(self, generation: Generation, started: float):
        self.gen = generation
        model = generation.model
        self.cache = model.side.new_cache() if model is not None else None
        self.pending = Pending()  # side requests answered since the last token
        self._before: tuple[list, int] = ([], -1)  # the cache before the last side request

    def start(self, event: StartEvent) -> None:
        """The session has started (its facts in `event`)."""

    def on(self, event: Event, size: int) -> TokenCost | None:
        """One event of the session (`size` bytes): the token to show, if it brings one."""
        if isinstance(event, SideRequestEvent):
            self.pending.bytes_to_device += size
            self.pending.contacts += 1
            t = time.perf_counter()
            g = self.side(event)
            self.pending.device_s += time.perf_counter() - t
            gen = self.gen
            sid = gen.session.session_id
            self.pending.bytes_from_device += gen.client.answer(
                sid, event.request_id, g, event.dtype
            )
            return None
        if isinstance(event, TokenEvent):
            return self.shown(token_cost(event, self.pending))
        return None

    def shown(self, token: TokenCost) -> TokenCost:
        """A token about to be shown: the next one's bill starts empty."""
        self.pending = Pending()
        return token

    def after_shown(self) -> None:
        """Called once the token is shown (run-ahead acknowledges it then)."""

    @torch.no_grad()
    def side(self, event: SideRequestEvent) -> torch.Tensor:
        """g(x) [rows, H] for the request's last position; taps from `start` (catch-up
        included; beam search: one row per beam, its shared prompt sent once, and the reorder
        of the beams since our last answer)."""
        cache, model = self.cache, self.gen.model
        taps = event.decode_taps(model.codec)
        start, rows, shared, positions = event.start, event.rows, event.shared, event.positions
        if cache.length > start:  # our last answer came too late: undo what it did to the cache
            kv, at = self._before
            cache.kv = (
                list(kv)
                if at == start
                else [
                    None if e is None else (e[0][:, :, :start], e[1][:, :, :start])
                    for e in cache.kv
                ]
            )
        if cache.length != start:
            raise DeviceError(
                f"side request starts at position {start}, the side network has seen {cache.length}"
            )
        self._before = (list(cache.kv), start)
        if event.reorder is not None:
            cache.reorder(torch.tensor(event.reorder))
        self.gen.accounts.tap_positions += shared + rows * (positions - shared)
        g = model.side(taps.to(model.side_dtype), cache)[:, -1]
        return self.strict(g, taps[:, -1])

    def strict(self, g: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """In strict mode the device's own gate decides on f(x) = the last rung's tap of the
        position asked (`last` [rows, R, H]): σ = 0 → answer 0 (f's own token)."""
        if not self.gen.strict:
            return g
        model = self.gen.model
        p = float(model.gate_prob(last[0, -1].to(model.side_dtype)))
        self.pending.gate_prob, self.pending.sigma = p, p >= model.config.threshold
        return g if self.pending.sigma else torch.zeros_like(g)


class Streamed(Pull):
    """Taps pushed as they exist: the side network runs over them on arrival, so a side request
    finds g of the newest position ready."""

    def __init__(self, generation: Generation, started: float):
        super().__init__(generation, started)
        self._ready: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (position, g, taps)

    def on(self, event: Event, size: int) -> TokenCost | None:
        if isinstance(event, TapsEvent):
            self.pending.bytes_to_device += size
            t = time.perf_counter()
            self.feed(event)
            self.gen.accounts.t_device_ahead += time.perf_counter() - t
            return None
        return super().on(event, size)

    @torch.no_grad()
    def feed(self, event: TapsEvent) -> None:
        cache, model = self.cache, self.gen.model
        if cache.length != event.start:
            raise DeviceError(
                f"taps start at position {event.start}, the side network has seen {cache.length}"
            )
        taps = event.decode_taps(model.codec)
        g = model.side(taps.to(model.side_dtype), cache)[:, -1]
        self._ready = (event.start + event.positions - 1, g, taps[:, -1])
        self.gen.accounts.tap_positions += event.positions

    @torch.no_grad()
    def side(self, event: SideRequestEvent) -> torch.Tensor:
        if self._ready is None:  # nothing streamed yet (a prompt-only ask): as pulled
            return super().side(event)
        at, g, last = self._ready
        if event.at != at:
            raise DeviceError(f"asked for g at position {event.at}, the taps reached {at}")
        return self.strict(g, last)


class RunAhead(Pull):
    """The backbone drafts without waiting; each draft is accepted (shown at once) or replaced
    by a correction (shown when the cloud confirms it); drafts of a withdrawn epoch are
    skipped."""

    def __init__(self, generation: Generation, started: float):
        super().__init__(generation, started)
        seed = generation.decode.seed
        self._rng = None if seed is None else torch.Generator().manual_seed(seed + 1)
        self._epoch: int | None = 0  # drafts of this epoch count (None: awaiting `corrected`)
        self._late = False  # the cloud ended before our correction: its drafts stand
        self._ack: VerdictIn | None = None  # "the drafts stand", sent once the token is shown
        self._prompt_ids: list[int] = []  # with repetition controls: from `start`
        self._shown = started  # when the last token was shown (first: the generation began)

    def start(self, event: StartEvent) -> None:
        self._prompt_ids = event.prompt_ids or []

    def on(self, event: Event, size: int) -> TokenCost | None:
        if isinstance(event, DraftEvent | CorrectedEvent):
            self.pending.bytes_to_device += size
            token = self.decide(event)
            return None if token is None else self.shown(token)
        return super().on(event, size)

    def after_shown(self) -> None:
        if self._ack is not None:  # the last draft stands: say so, once shown
            gen = self.gen
            sent, _ = gen.client.verdict(gen.session.session_id, self._ack)
            gen.accounts.bytes_from_device += sent
            gen.accounts.contacts += 1
            self._ack = None

    @torch.no_grad()
    def decide(self, event: DraftEvent | CorrectedEvent) -> TokenCost | None:
        """Accept a draft (a token to show now) or post a correction; None: nothing to show."""
        gen, pending = self.gen, self.pending
        if isinstance(event, CorrectedEvent):
            self._epoch = event.epoch
            return self.bill(event, "correction", event.cloud_ms)
        if event.epoch != self._epoch:
            return None  # withdrawn: a correction before it changed what follows
        if self._late:  # the cloud ended before our correction: its drafts stand
            return self.bill(event, "fallback", event.cloud_ms)
        model, cache, t = gen.model, self.cache, time.perf_counter()
        if cache.length != event.start:
            raise DeviceError(
                f"draft taps start at position {event.start}, the side network has seen "
                f"{cache.length}"
            )
        g = model.side(event.decode_taps(model.codec).to(model.side_dtype), cache)[0, -1]
        history = self._prompt_ids + [t.id for t in gen.tokens[: event.index]]
        token, sigma, p = verdict(
            model, event.decode_f(), g, event.id, gen.decode, self._rng, history
        )
        pending.device_s += time.perf_counter() - t
        pending.gate_prob, pending.sigma = p, sigma
        gen.accounts.tap_positions += event.positions
        if token != event.id:
            body = VerdictIn(epoch=event.epoch, index=event.index, token=token)
            sent, taken = gen.client.verdict(gen.session.session_id, body)
            pending.bytes_from_device += sent
            pending.contacts += 1
            if taken:
                self._epoch = None  # wait for the cloud's `corrected`
                return None
            self._late = True
            return self.bill(event, "fallback", event.cloud_ms)
        if event.last:  # posted once the token is shown (the user need not wait for it)
            self._ack = VerdictIn(epoch=event.epoch, index=event.index)
        return self.bill(event, "device" if sigma else "cloud", event.cloud_ms)

    def bill(self, event, branch: str, cloud_ms: float) -> TokenCost:
        """A token shown now: the user waited since the previous one; the wait is apportioned
        to the cloud's compute, then the device's, the rest to the network."""
        pending, now = self.pending, time.perf_counter()
        wait, self._shown = now - self._shown, now
        cloud_s = min(cloud_ms / 1000, wait)
        device_s = min(pending.device_s, wait - cloud_s)
        return TokenCost(
            index=event.index,
            id=event.id,
            text=event.text,
            branch=branch,
            gate_prob=pending.gate_prob,
            cloud_s=cloud_s,
            device_s=device_s,
            net_s=wait - cloud_s - device_s,
            bytes_to_device=pending.bytes_to_device,
            bytes_from_device=pending.bytes_from_device,
            contacts=pending.contacts,
        )


def token_cost(event: TokenEvent, pending: Pending) -> TokenCost:
    """A token the cloud decided, with the side requests answered for it."""
    wait = event.device_wait_ms / 1000
    branch = event.branch
    if branch == "device" and not pending.sigma:
        branch = "cloud"  # strict mode: asked, but the device's gate kept f's token
    return TokenCost(
        index=event.index,
        id=event.id,
        text=event.text,
        branch=branch,
        gate_prob=event.gate_prob if pending.gate_prob is None else pending.gate_prob,
        cloud_s=event.cloud_ms / 1000,
        device_s=pending.device_s,
        net_s=max(0.0, wait - pending.device_s),
        bytes_to_device=pending.bytes_to_device,
        bytes_from_device=pending.bytes_from_device,
        contacts=pending.contacts,
    )


MODES: dict[str, type[Pull]] = {"pull": Pull, "streamed": Streamed, "run-ahead": RunAhead}
