"""`POST /v1/recommendations`: next-item recommendation on item codes — ranked by the cloud's own
code target, or (`POST /v1/recommendations/sessions`, `RecommendSession`) by the backbone with the
device's own side network, asked once per pass over the code trie's token tree.

The catalogue (`--catalogue`) becomes item codes (`personalization.atspeed.codes`: public, built
from the titles alone, cached), published at `GET /v1/codes`; the target (`--recommend-target`:
the one `spa train-target` trained last for this backbone and catalogue, or a checkpoint) and the
draft of strict speculative search (the coded backbone's first two layers) load on first use and
stay. A search of the cloud's own target holds the backbone's compute lock like every other pass,
so it queues behind — and never interleaves with — the sessions' steps. A recommendation session
does not: it waits for its device between passes, so its passes run beside the scheduler's,
unlocked. The target's answers are deterministic and the target is fixed for the server's life,
so repeats are answered from an LRU memory (`--recommend-cache`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch

from cloud_api.errors import ApiError
from cloud_api.sessions import Session, tap_fields
from cloud_api.settings import CloudSettings
from personalization.atspeed.code_target import CodeRecommender, default_code_target
from personalization.atspeed.codes import CodeConfig, cached_codes
from personalization.atspeed.draft import Draft, DraftConfig
from personalization.atspeed.prompts import UnknownItemError
from personalization.atspeed.recommend import RecommendConfig, load_titles
from personalization.backbone.frozen import Backbone
from personalization.errors import SpaError
from protocol import wire
from protocol.events import RecommendedEvent, StartEvent, TreeRequestEvent
from protocol.messages import CodesOut, RecommendedItem, RecommendIn, RecommendOut

log = logging.getLogger("cloud_api.recommend")


class Recommender:
    """The cloud's catalogue as item codes, its trained target and the draft, made on first use."""

    def __init__(self, backbone: Backbone, settings: CloudSettings, compute: threading.Lock):
        self.backbone, self.settings, self.compute = backbone, settings, compute
        self._codes: tuple[CodeRecommender, Draft] | None = None
        self._target: tuple[CodeRecommender, str] | None = None
        self._lock = threading.Lock()
        self._memory: OrderedDict[tuple, RecommendOut] = OrderedDict()  # LRU, by request

    def _trained(self, titles: list[str]) -> tuple[Path, CodeConfig] | None:
        """The target's checkpoint and the code config it was trained with."""
        choice = self.settings.recommend_target
        if choice == "default":
            return default_code_target(self.backbone, titles)
        record = Path(choice).with_suffix(".json")
        try:
            return Path(choice), CodeConfig(**json.loads(record.read_text())["codes_config"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ApiError(
                503,
                f"recommendation is not available: {record}, the target's training record "
                "beside it, is missing or damaged",
            ) from None

    def parts(self) -> tuple[CodeRecommender, Draft]:
        """The codes (their trie and coded backbone) and the draft; no trained target needed."""
        with self._lock:
            if self._codes is None:
                s = self.settings
                if s.catalogue is None:
                    raise ApiError(404, "this cloud serves no catalogue (spa cloud --catalogue)")
                try:
                    titles = load_titles(s.catalogue)
                    try:  # the codes the target was trained on; sessions need no target
                        trained = self._trained(titles)
                    except ApiError:
                        trained = None
                    codes = cached_codes(titles, trained[1] if trained else CodeConfig())
                except SpaError as exc:  # a misconfigured cloud: say so, do not crash
                    raise ApiError(503, f"recommendation is not available: {exc}") from None
                rec = CodeRecommender.build(self.backbone, codes)
                draft = Draft(rec.backbone, DraftConfig(layers=min(2, rec.backbone.num_layers - 1)))
                self._codes = (rec, draft)
            return self._codes

    def target(self) -> CodeRecommender:
        """The trained code target; 503 until one is trained for this backbone and catalogue."""
        rec, _ = self.parts()
        with self._lock:
            if self._target is None:
                trained = self._trained(list(rec.codes.titles))
                if trained is None:
                    raise ApiError(
                        503,
                        "no recommendation target is trained for this backbone and "
                        "catalogue yet: run `spa train-target HISTORIES --catalogue "
                        f"{self.settings.catalogue}` (spa demo trains its own)",
                    )
                try:
                    target = rec.with_target(trained[0])
                except SpaError as exc:
                    raise ApiError(503, f"recommendation is not available: {exc}") from None
                self._target = (target, f"{trained[0].name} ({target.model.setting})")
            return self._target[0]

    def codes(self) -> CodesOut:
        rec, _ = self.parts()
        c = rec.codes
        return CodesOut(
            fingerprint=c.fingerprint,
            levels=c.config.levels,
            codebook=c.config.codebook,
            length=c.length,
            titles=list(c.titles),
            codes=c.codes.tolist(),
            stats=c.stats,
            vocab_size=rec.vocab,
            instruction=list(rec.prompts.instruction),
            backbone_fingerprint=rec.backbone.fingerprint,
        )

    def coded(self, fingerprint: str) -> Backbone:
        """The backbone reading these codes (for a device's features and head on codes)."""
        rec, _ = self.parts()
        if fingerprint != rec.codes.fingerprint:
            raise ApiError(
                409,
                f"the cloud's item codes are {rec.codes.fingerprint}, not {fingerprint}: "
                "fetch GET /v1/codes again",
            )
        return rec.backbone

    def __call__(self, body: RecommendIn) -> RecommendOut:
        key = (tuple(body.history), body.strategy, body.k, body.gamma, body.exclude_purchased)
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
        target = self.target()
        _, draft = self.parts()
        cfg = RecommendConfig(strategy=body.strategy, k=body.k, gamma=body.gamma)
        item_prompt(target, body.history)  # an unknown item: 422 before any search
        with self.compute:
            t0 = time.perf_counter()
            result = target.recommend(
                body.history, cfg, draft, exclude_purchased=body.exclude_purchased
            )
            seconds = time.perf_counter() - t0
        return RecommendOut(
            items=items(target, result.items[0]),
            target=self._target[1],
            strategy=body.strategy,
            k=body.k,
            seconds=seconds,
            target_passes=result.target_passes,
            acceptance=None if result.stats is None else result.stats.acceptance,
        )


def item_prompt(rec: CodeRecommender, history: list[str]) -> list[int]:
    """The history as codes; 422 naming an item the catalogue does not hold."""
    try:
        return rec.prompt(history)
    except UnknownItemError as exc:
        raise ApiError(422, f"{exc}: every history item must be a catalogue title") from None


def items(rec: CodeRecommender, found) -> list[RecommendedItem]:
    return [RecommendedItem(title=i.title, code=rec.label(i.title), score=i.score) for i in found]


class RecommendSession(Session):
    """A recommendation whose target's side network is the device's: the tree search runs here,
    and each target pass asks the device once for g(x) of its new positions (`tree_request`).
    A device that misses a deadline leaves the rest of the search to the backbone alone."""

    def __init__(
        self,
        *,
        codes: CodeRecommender,
        history: list[str],
        exclude_purchased: bool,
        draft: Draft,
        config: RecommendConfig,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.codes, self.draft, self.config = codes, draft, config
        self.history, self.exclude_purchased = history, exclude_purchased
        self._keep: torch.Tensor | None = None  # the side cache's cut, sent with the next ask
        self._unanswered = False

    # ---- the device's side network over the tree (personalization.atspeed.speculative.TreeSide)
    def keep(self, index: torch.Tensor) -> None:
        self._keep = index

    def __call__(self, taps: torch.Tensor, mask: torch.Tensor, real: torch.Tensor):
        self.events.attached.wait()  # paused while the device is away (cancel wakes it)
        if self._stop or self._unanswered:
            return None
        rows, positions = taps.shape[:2]
        request = self.requests.open(0, positions, int(real.sum()))
        if self._stop:  # after opening: a cancel either saw this request or is seen here
            return None
        keep, self._keep = self._keep, None
        sent = self._emit(
            TreeRequestEvent(
                request_id=request.id,
                deadline_s=self.deadline_s,
                mask=wire.b64encode(wire.pack_bits(mask)),
                mask_shape=list(mask.shape),
                real=wire.b64encode(wire.pack_bits(real)),
                keep=None if keep is None else keep.tolist(),
                **tap_fields(self.model.codec, self.tap_dtype, 0, taps, 0),
            )
        )
        self.ledger.books.contacts += 1
        self.ledger.books.tap_positions += rows * positions
        self.ledger.books.bytes_to_device += sent
        if not self._await(request):
            self._unanswered = True  # its side cache missed this pass: ask no more
            return None
        return request.g

    # ---- the search thread ---------------------------------------------------------------------
    def _decode(self) -> None:
        self._emit(StartEvent(**dict(self.facts())))
        t0 = time.perf_counter()
        result = self.codes.recommend(
            self.history,
            self.config,
            self.draft,
            exclude_purchased=self.exclude_purchased,
            model=self.model,
            side=self,
        )
        seconds = time.perf_counter() - t0
        if not self._stop:
            self._emit(
                RecommendedEvent(
                    items=items(self.codes, result.items[0]),
                    target_passes=result.target_passes,
                    seconds=seconds,
                    acceptance=None
                    if self.config.strategy == "beam" or result.stats is None
                    else result.stats.acceptance,
                )
            )
        self.ledger.books.t_cloud = seconds - self.ledger.books.device_wait_s
