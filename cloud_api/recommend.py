"""`POST /v1/recommendations`: next-item recommendation under the cloud's catalogue.

The catalogue (`--catalogue`), the target (`--recommend-target`: the trained default, the
backbone alone, or a checkpoint) and the draft of strict speculative search (the backbone's
first two layers) load on the first request and stay. A search holds the backbone's compute lock
like every other pass, so it queues behind — and never interleaves with — the sessions' steps.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from cloud_api.errors import ApiError
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
from protocol.messages import RecommendedItem, RecommendIn, RecommendOut


class Recommender:
    def __init__(self, backbone: Backbone, settings: CloudSettings, compute: threading.Lock):
        self.backbone, self.settings, self.compute = backbone, settings, compute
        self._loaded: tuple[Catalogue, SPAModel, str, Draft] | None = None
        self._lock = threading.Lock()

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

    def __call__(self, body: RecommendIn) -> RecommendOut:
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
