"""`POST /v1/recommendations`: next-item recommendation under the cloud's catalogue — ranked by
the cloud's own target, or (`POST /v1/recommendations/sessions`, `RecommendSession`) by the
backbone with the device's own side network, asked once per pass over the token tree.

The catalogue (`--catalogue`), the target (`--recommend-target`: the trained default, the
backbone alone, or a checkpoint) and the draft of strict speculative search (the backbone's
first two layers) load on the first request and stay. A search of the cloud's own target holds
the backbone's compute lock like every other pass, so it queues behind — and never interleaves
with — the sessions' steps. A recommendation session does not: it waits for its device between
passes, so its passes run beside the scheduler's, unlocked. The target's answers are
deterministic and the target is fixed for the server's life, so repeats are answered from an LRU
memory (`--recommend-cache`; a federated evaluation asks for the same user's every round).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch

from cloud_api.errors import ApiError
from cloud_api.sessions import Session, SideRequest
from cloud_api.settings import CloudSettings
from personalization.atspeed.catalogue import Catalogue
from personalization.atspeed.draft import Draft, DraftConfig
from personalization.atspeed.recommend import (
    RecommendConfig,
    history_prompt,
    load_titles,
    recommend,
)
from personalization.atspeed.target import default_target
from personalization.backbone.frozen import Backbone
from personalization.config import SPAConfig
from personalization.errors import SpaError
from personalization.model import SPAModel
from personalization.training.checkpoint import load_checkpoint
from protocol import wire
from protocol.events import RecommendedEvent, StartEvent, TreeRequestEvent
from protocol.messages import RecommendedItem, RecommendIn, RecommendOut

log = logging.getLogger("cloud_api.recommend")


class Recommender:
    def __init__(self, backbone: Backbone, settings: CloudSettings, compute: threading.Lock):
        self.backbone, self.settings, self.compute = backbone, settings, compute
        self._loaded: tuple[Catalogue, SPAModel, str, Draft] | None = None
        self._lock = threading.Lock()
        self._memory: OrderedDict[tuple, RecommendOut] = OrderedDict()  # LRU, by request

    def _load(self) -> tuple[Catalogue, SPAModel, str, Draft]:
        with self._lock:
            if self._loaded is None:
                s, f = self.settings, self.backbone
                if s.catalogue is None:
                    raise ApiError(404, "this cloud serves no catalogue (spa cloud --catalogue)")
                try:
                    catalogue = Catalogue.from_titles(f, load_titles(s.catalogue))
                    path = default_target(f) if s.recommend_target == "default" else (
                        None if s.recommend_target == "zero-shot" else Path(s.recommend_target)
                    )  # fmt: skip
                    if path is None:
                        target, name = SPAModel(f, SPAConfig(setting="base")), "zero-shot"
                    else:
                        target = load_checkpoint(path, f)[0].eval()
                        name = f"{path.name} ({target.setting})"
                except SpaError as exc:  # a misconfigured cloud: say so, do not crash
                    raise ApiError(503, f"recommendation is not available: {exc}") from None
                draft = Draft(f, DraftConfig(layers=min(2, f.num_layers - 1)))
                self._loaded = (catalogue, target, name, draft)
            return self._loaded

    def parts(self) -> tuple[Catalogue, Draft]:
        """The catalogue and the draft, for a session that brings its own side network."""
        catalogue, _target, _name, draft = self._load()
        return catalogue, draft

    def __call__(self, body: RecommendIn) -> RecommendOut:
        key = (tuple(body.history), body.strategy, body.k, body.gamma)
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key].model_copy(update={"cached": True}, deep=True)
        out = self._search(body)
        with self._lock:  # a copy: what the caller does with `out` cannot change the memory
            self._memory[key] = out.model_copy(deep=True)
            while len(self._memory) > self.settings.recommend_cache:
                self._memory.popitem(last=False)
        return out

    def _search(self, body: RecommendIn) -> RecommendOut:
        catalogue, target, name, draft = self._load()
        cfg = RecommendConfig(strategy=body.strategy, k=body.k, gamma=body.gamma)
        prompt = history_prompt(self.backbone, body.history, self.settings.max_prompt_tokens)
        with self.compute:
            t0 = time.perf_counter()
            result = recommend(target, catalogue, [prompt], cfg, draft)
            seconds = time.perf_counter() - t0
        return RecommendOut(
            items=[RecommendedItem(title=i.title, score=i.score) for i in result.items[0]],
            target=name, strategy=body.strategy, k=body.k, seconds=seconds,
            target_passes=result.target_passes,
            acceptance=None if result.stats is None else result.stats.acceptance,
        )  # fmt: skip


class RecommendSession(Session):
    """A recommendation whose target's side network is the device's: the tree search runs here,
    and each target pass asks the device once for g(x) of its new positions (`tree_request`).
    A device that misses a deadline leaves the rest of the search to the backbone alone."""

    def __init__(
        self,
        *,
        catalogue: Catalogue,
        draft: Draft,
        config: RecommendConfig,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.catalogue, self.draft, self.config = catalogue, draft, config
        self._keep: torch.Tensor | None = None  # the side cache's cut, sent with the next ask
        self._unanswered = False

    # ---- the device's side network over the tree (personalization.atspeed.speculative.TreeSide)
    def keep(self, index: torch.Tensor) -> None:
        self._keep = index

    def __call__(self, taps: torch.Tensor, mask: torch.Tensor, real: torch.Tensor):
        self._attached.wait()  # paused while the device is away (cancel wakes it)
        with self._lock:
            if self._stop or self._unanswered:
                return None
            rows, positions = taps.shape[:2]
            request = SideRequest(len(self._requests) + 1, 0, positions, int(real.sum()))
            self._requests[request.id] = request
        keep, self._keep = self._keep, None
        sent = self._emit(
            TreeRequestEvent(
                request_id=request.id, deadline_s=self.deadline_s,
                mask=wire.b64encode(wire.pack_bits(mask)), mask_shape=list(mask.shape),
                real=wire.b64encode(wire.pack_bits(real)),
                keep=None if keep is None else keep.tolist(),
                **self._taps(0, taps, 0),
            )
        )  # fmt: skip
        self.totals.device_contacts += 1
        self.totals.tap_positions += rows * positions
        self.totals.bytes_to_device += sent
        if not self._await(request):
            self._unanswered = True  # its side cache missed this pass: ask no more
            return None
        return request.g

    # ---- the search thread ---------------------------------------------------------------------
    def _run(self) -> None:
        started = time.perf_counter()
        status, reason = "finished", ""
        try:
            self.records.update_session(self.id, status="running")
            self._emit(StartEvent(**dict(self.facts())))
            t0 = time.perf_counter()
            result = recommend(self.model, self.catalogue, [self.prompt_ids], self.config,
                               self.draft, side=self)  # fmt: skip
            seconds = time.perf_counter() - t0
            if not self._stop:
                self._emit(
                    RecommendedEvent(
                        items=[RecommendedItem(title=i.title, score=i.score)
                               for i in result.items[0]],
                        target_passes=result.target_passes, seconds=seconds,
                        acceptance=None if self.config.strategy == "beam" or result.stats is None
                        else result.stats.acceptance,
                    )
                )  # fmt: skip
            self.totals.cloud_s = seconds - self.totals.device_wait_s
        except Exception as exc:  # a bug must end this session cleanly, not the server
            log.exception("recommendation session %s failed", self.id)
            status, reason = "failed", f"{type(exc).__name__}: {exc}"[:200]
        if self._stop:
            status, reason = self._stop
        self.totals.wall_s = time.perf_counter() - started
        self._end(status, reason)
