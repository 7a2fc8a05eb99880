"""The process-wide state of the cloud: backbone (loaded in the background), records, sessions.

One `Cloud` per application. The backbone loads in a thread at startup so that /healthz answers
at once and /readyz says when the model is there; anything that needs it before then gets a 503
with Retry-After.
"""

from __future__ import annotations

import logging
import threading
import uuid

import torch

from cloud_api import __version__, admission, training
from cloud_api.db import Records, SessionRow
from cloud_api.errors import ApiError
from cloud_api.recommend import Recommender, RecommendSession, item_prompt
from cloud_api.run_ahead import RunAheadSession
from cloud_api.scheduler import BatchedBackbone, Stats, StepScheduler
from cloud_api.sessions import GenerationSession, Registry, Session
from cloud_api.settings import CloudSettings
from personalization.atspeed.recommend import RecommendConfig
from personalization.backbone.frozen import Backbone
from personalization.backbone.loading import load_backbone
from personalization.baselines import baseline_parameters
from personalization.config import (
    GATED_SETTINGS,
    SERVED_SETTINGS,
    STRATEGIES,
    TAP_ENCODINGS,
    TAP_MODES,
)
from protocol import PROTOCOL_VERSION, wire
from protocol.messages import Info, RecommendIn, RecommendOut, RecommendSessionIn, SessionIn

log = logging.getLogger("cloud_api")


class Cloud:
    """Settings, the frozen backbone, the records and the live sessions of one server."""

    def __init__(self, settings: CloudSettings, backbone: Backbone | None = None):
        self.settings = settings
        self.records = Records(settings.database_url)
        self.registry = Registry(settings.max_sessions, settings.session_ttl_s, settings.resume_s)
        self.compute = threading.Lock()  # one backbone pass at a time (see scheduler.py)
        self._batched: BatchedBackbone | None = None  # sessions' backbone, once it is loaded
        self.backbone = backbone
        self.load_error: str | None = None
        self.loaded = threading.Event()
        self._heads: dict[str, bytes] = {}
        self._codecs: dict[str, bytes] = {}
        self._recommender: Recommender | None = None
        self._recommender_lock = threading.Lock()
        if backbone is not None:
            self.loaded.set()

    # ---- the backbone ----------------------------------------------------------------------------
    def load_in_background(self) -> None:
        if self.loaded.is_set():
            return
        threading.Thread(target=self._load, name="backbone-loader", daemon=True).start()

    def _load(self) -> None:
        try:
            dtype = getattr(torch, self.settings.dtype)
            self.backbone = load_backbone(self.settings.backbone, dtype=dtype)
            log.info("backbone %s ready", self.backbone.name)
        except Exception as exc:  # reported by /readyz; the server stays up to say so
            log.exception("backbone %s failed to load", self.settings.backbone)
            self.load_error = f"{type(exc).__name__}: {exc}"
        finally:
            self.loaded.set()

    def require_backbone(self) -> Backbone:
        if self.backbone is not None:
            return self.backbone
        if self.load_error:
            raise ApiError(503, f"the backbone failed to load: {self.load_error}")
        raise ApiError(503, "the backbone is still loading; retry shortly", {"Retry-After": "2"})

    def info(self) -> Info:
        return server_info(self.require_backbone(), self.settings)

    def head(self, dtype: str, codes: str | None = None) -> bytes:
        """The frozen head (over item codes: `codes`), encoded once per dtype."""
        f = self.require_backbone()
        if codes is not None:
            f = self.recommender().coded(codes)
        key = (dtype, codes)
        if key not in self._heads:
            self._heads[key] = training.head(f, dtype)
        return self._heads[key]

    def codec(self, name: str) -> bytes:
        """The public basis of a tap encoding (empty for those that need none), once each."""
        f = self.require_backbone()
        if name not in TAP_ENCODINGS:
            offered = ", ".join(TAP_ENCODINGS)
            raise ApiError(404, f"no tap encoding {name!r}; the cloud offers {offered}")
        if name not in self._codecs:
            with self.compute:  # fitting the basis runs the backbone once
                self._codecs[name] = training.codec(f, name)
        return self._codecs[name]

    # ---- recommendation --------------------------------------------------------------------------
    def recommender(self) -> Recommender:
        """The catalogue, target and draft of recommendation, made on first use."""
        f = self.require_backbone()
        with self._recommender_lock:
            if self._recommender is None:
                self._recommender = Recommender(f, self.settings, self.compute)
        return self._recommender

    def recommend(self, body: RecommendIn) -> RecommendOut:
        return self.recommender()(body)

    # ---- sessions --------------------------------------------------------------------------------
    def open_session(self, device_id: str, body: SessionIn) -> Session:
        """Validate a session request against the backbone and the limits, then register it."""
        f, limits = self.require_backbone(), self.settings
        prompt = admission.prompt_ids(f, body, limits)
        decode = admission.decode_config(body.decoding, limits)
        deadline = admission.deadline(body.deadline_s, limits)
        rungs = training.check_rungs(body.rungs, f.num_layers)
        gated = body.setting in GATED_SETTINGS
        # strict: the gate stays on the device, which is asked every token (σ = 1, M = 1)
        threshold = 0.0 if gated and body.strict else body.threshold
        # its passes share batches with every other session's
        model = admission.device_model(self.batched(), body, rungs, threshold, limits)
        mode = admission.tap_mode(body, rungs, f.num_layers, limits.tap_mode)
        kind = RunAheadSession if mode == "run-ahead" else GenerationSession
        session = kind(
            **self._session_fields(device_id, model, prompt, decode, deadline),
            strict=body.strict and gated,
            tap_mode=mode,
        )
        return self._admit(session, body.decoding.strategy, threshold)

    def open_recommendation(self, device_id: str, body: RecommendSessionIn) -> RecommendSession:
        """A recommendation ranked by the backbone with the device's side network (over a
        session's event stream); validated like a session, capped with them."""
        f, limits = self.require_backbone(), self.settings
        deadline = admission.deadline(body.deadline_s, limits)
        rungs = training.check_rungs(body.rungs, f.num_layers)
        codes, draft = self.recommender().parts()
        model = admission.device_model(codes.backbone, body, rungs, body.threshold, limits)
        config = RecommendConfig(strategy=body.strategy, k=body.k, gamma=body.gamma)
        prompt, decode = item_prompt(codes, body.history), config.decode(codes.catalogue)
        session = RecommendSession(
            **self._session_fields(device_id, model, prompt, decode, deadline),
            strict=False,
            codes=codes,
            history=body.history,
            exclude_purchased=body.exclude_purchased,
            draft=draft,
            config=config,
        )
        return self._admit(session, f"recommend-{body.strategy}", body.threshold)

    def _session_fields(self, device_id, model, prompt, decode, deadline) -> dict:
        """What every kind of session is opened with."""
        return {
            "session_id": self._new_session_id(),
            "device_id": device_id,
            "model": model,
            "prompt_ids": prompt,
            "decode": decode,
            "deadline_s": deadline,
            "resume_s": self.settings.resume_s,
            "records": self.records,
            "on_end": self.registry.remove,
        }

    def _admit(self, session: Session, strategy: str, threshold: float) -> Session:
        """Register a session (429 beyond the cap) and record it; neither or both."""
        self.registry.add(session)
        model = session.model
        try:
            self.records.add_session(
                SessionRow(
                    id=session.id,
                    device_id=session.device_id,
                    setting=model.setting,
                    strategy=strategy,
                    strict=session.strict,
                    threshold=threshold,
                    rungs=",".join(map(str, model.rungs)),
                    tap_dtype=model.config.wire_dtype,
                    deadline_s=session.deadline_s,
                    prompt_tokens=len(session.prompt_ids),
                    max_new_tokens=session.decode.max_new_tokens,
                )
            )
        except Exception:
            self.registry.remove(session)
            raise
        return session

    def _new_session_id(self) -> str:
        """32 characters: random hex, after `<replica>-` where the server has a replica name."""
        replica = self.settings.replica
        if replica is None:
            return uuid.uuid4().hex
        return f"{replica}-{uuid.uuid4().hex[: 31 - len(replica)]}"

    def batched(self) -> BatchedBackbone:
        """The backbone sessions decode with: its passes batched by the step scheduler."""
        with self.compute:
            if self._batched is None:
                s = self.settings
                scheduler = StepScheduler(
                    self.require_backbone(),
                    self.compute,
                    s.max_batch,
                    s.batch_wait_s,
                    s.prefill_chunk,
                )
                self._batched = BatchedBackbone(self.require_backbone(), scheduler)
        return self._batched

    def scheduler_stats(self) -> Stats:
        """What the step scheduler did so far (all zero before the first session)."""
        return Stats() if self._batched is None else self._batched.scheduler.stats

    def owned_session(self, session_id: str, device_id: str, *, ended: bool = False) -> Session:
        """A live session of this device (with `ended`, also one still resumable); another
        device's is as invisible as a missing one."""
        session = self.registry.get(session_id, ended=ended)
        if session is not None and session.device_id == device_id:
            return session
        row = self.records.get_session(session_id)
        if row is not None and row.device_id == device_id:
            raise ApiError(409, f"session {session_id} has ended ({row.status})")
        raise ApiError(404, f"no session {session_id} for this device")

    def close(self) -> None:
        self.registry.cancel_all("the server is shutting down")
        if self._batched is not None:
            self._batched.scheduler.close()
        self.records.close()


def server_info(f: Backbone, settings: CloudSettings) -> Info:
    """What `GET /v1/info` tells a device: the backbone's facts, the offers and limits."""
    return Info(
        version=__version__,
        protocol_version=PROTOCOL_VERSION,
        backbone=f.name,
        fingerprint=f.fingerprint,
        num_layers=f.num_layers,
        hidden_size=f.hidden_size,
        vocab_size=f.vocab_size,
        eos_token_ids=sorted(f.eos_token_ids),
        chat_template=bool(f.chat_template),
        dtype=str(f.dtype).removeprefix("torch."),
        rungs_offered=list(range(1, f.num_layers + 1)),
        default_rungs=list(training.check_rungs(None, f.num_layers)),
        tap_dtype=settings.tap_dtype,
        tap_dtypes=list(wire.DTYPES),
        tap_encoding=settings.tap_encoding,
        tap_encodings=list(TAP_ENCODINGS),
        tap_mode=settings.tap_mode,
        tap_modes=list(TAP_MODES),
        settings=list(SERVED_SETTINGS),
        strategies=list(STRATEGIES),
        limits=settings.limits(),
        parameters={
            "backbone": f.num_parameters,
            "lora": baseline_parameters(f, "lora"),
            "adapter": baseline_parameters(f, "adapter"),
        },
    )
