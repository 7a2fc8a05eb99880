"""The process-wide state of the cloud: backbone (loaded in the background), records, sessions.

One `Cloud` per application. The backbone loads in a thread at startup so that /healthz answers
at once and /readyz says when the model is there; anything that needs it before then gets a 503
with Retry-After.
"""

from __future__ import annotations

import logging
import secrets
import threading
import uuid

import torch

from cloud_api import __version__, training
from cloud_api.db import Records, SessionRow
from cloud_api.errors import ApiError
from cloud_api.recommend import Recommender, RecommendSession, item_prompt
from cloud_api.run_ahead import RunAheadSession
from cloud_api.scheduler import BatchedBackbone, Stats, StepScheduler
from cloud_api.sessions import Registry, Session
from cloud_api.settings import CloudSettings
from personalization.atspeed.recommend import RecommendConfig
from personalization.backbone.frozen import Backbone
from personalization.backbone.loading import load_backbone
from personalization.baselines import baseline_parameters
from personalization.config import (
    GATED_SETTINGS,
    SERVED_SETTINGS,
    SIDE_SETTINGS,
    STRATEGIES,
    TAP_ENCODINGS,
    TAP_MODES,
    DecodeConfig,
    SideConfig,
    SPAConfig,
)
from personalization.model import SPAModel
from protocol import PROTOCOL_VERSION, wire
from protocol.messages import (
    GateIn,
    Info,
    RecommendIn,
    RecommendOut,
    RecommendSessionIn,
    SessionIn,
)

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
            self.backbone = load_backbone(self.settings.backbone)
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
        f = self.require_backbone()
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
            rungs_offered=list(range(1, f.num_layers + 1)),
            default_rungs=list(training.check_rungs(None, f.num_layers)),
            tap_dtype=self.settings.tap_dtype,
            tap_dtypes=list(wire.DTYPES),
            tap_encoding=self.settings.tap_encoding,
            tap_encodings=list(TAP_ENCODINGS),
            tap_mode=self.settings.tap_mode,
            tap_modes=list(TAP_MODES),
            settings=list(SERVED_SETTINGS),
            strategies=list(STRATEGIES),
            limits=self.settings.limits(),
            parameters={
                "backbone": f.num_parameters,
                "lora": baseline_parameters(f, "lora"),
                "adapter": baseline_parameters(f, "adapter"),
            },
        )

    def head(self, dtype: str) -> bytes:
        """The frozen head, encoded once per dtype."""
        f = self.require_backbone()
        if dtype not in self._heads:
            self._heads[dtype] = training.head(f, dtype)
        return self._heads[dtype]

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
        if body.conversation is not None:
            try:
                prompt = f.encode_chat([m.model_dump() for m in body.conversation])
            except ValueError as exc:
                raise ApiError(422, f"prompt: {exc}") from None
        elif isinstance(body.prompt, list):
            training.check_ids(body.prompt, f.vocab_size, "prompt")
            prompt = list(body.prompt)
        else:
            prompt = f.encode_prompt(body.prompt, system=body.system, chat=body.chat)
        if len(prompt) > limits.max_prompt_tokens:
            raise ApiError(
                413,
                f"the prompt has {len(prompt)} tokens; the limit is {limits.max_prompt_tokens} "
                "(SPA_CLOUD_MAX_PROMPT_TOKENS)",
            )
        decoding = body.decoding
        max_new_tokens = decoding.max_new_tokens or min(64, limits.max_new_tokens)
        if max_new_tokens > limits.max_new_tokens:
            raise ApiError(
                422,
                f"decoding.max_new_tokens {max_new_tokens} is over the limit "
                f"{limits.max_new_tokens} (SPA_CLOUD_MAX_NEW_TOKENS)",
            )
        deadline = body.deadline_s or min(limits.default_deadline_s, limits.max_deadline_s)
        if deadline > limits.max_deadline_s:
            raise ApiError(
                422,
                f"deadline_s {deadline:g} is over the limit {limits.max_deadline_s:g} "
                "(SPA_CLOUD_MAX_DEADLINE_S)",
            )
        rungs = training.check_rungs(body.rungs, f.num_layers)
        dtype = body.tap_dtype or limits.tap_dtype
        gated = body.setting in GATED_SETTINGS
        # strict: the gate stays on the device, which is asked every token (σ = 1, M = 1)
        threshold = 0.0 if gated and body.strict else body.threshold
        seed = decoding.seed
        if decoding.strategy == "sample" and seed is None:
            seed = secrets.randbelow(2**31)  # reported, so the device can replay the run
        model = self._device_model(
            self.batched(),  # its passes share batches with every other session's
            body,
            rungs,
            threshold,
            None if body.strict else body.gate,
        )
        decode = DecodeConfig(
            strategy=decoding.strategy,
            max_new_tokens=max_new_tokens,
            temperature=decoding.temperature,
            top_p=decoding.top_p,
            seed=seed,
            num_beams=decoding.num_beams,
            repetition_penalty=decoding.repetition_penalty,
            no_repeat_ngram_size=decoding.no_repeat_ngram_size,
        )
        mode = self._tap_mode(body, rungs, f.num_layers)
        kind = RunAheadSession if mode == "run-ahead" else Session
        session = kind(
            session_id=self._new_session_id(),
            device_id=device_id,
            model=model,
            prompt_ids=prompt,
            decode=decode,
            deadline_s=deadline,
            strict=body.strict and gated,
            tap_mode=mode,
            resume_s=limits.resume_s,
            records=self.records,
            on_end=self.registry.remove,
        )
        self.registry.add(session)  # 429 beyond the cap
        try:
            self.records.add_session(
                SessionRow(
                    id=session.id,
                    device_id=device_id,
                    setting=body.setting,
                    strategy=decoding.strategy,
                    strict=session.strict,
                    threshold=threshold,
                    rungs=",".join(map(str, rungs)),
                    tap_dtype=dtype,
                    deadline_s=deadline,
                    prompt_tokens=len(prompt),
                    max_new_tokens=max_new_tokens,
                )
            )
        except Exception:
            self.registry.remove(session)
            raise
        return session

    def _device_model(
        self,
        backbone,
        body: SessionIn | RecommendSessionIn,
        rungs: list[int],
        threshold: float,
        gate: GateIn | None,
    ) -> SPAModel:
        """The cloud's half of a device's model: the backbone, the gate's weights (when sent),
        and a width-1 side network that carries only the rungs and the dtype (the cloud never
        runs g)."""
        f = self.require_backbone()
        side = SideConfig(
            hidden_size=f.hidden_size, num_layers=f.num_layers, rungs=rungs, reduction=f.hidden_size
        )
        config = SPAConfig(
            setting=body.setting,
            threshold=threshold,
            wire_dtype=body.tap_dtype or self.settings.tap_dtype,
            tap_encoding=body.tap_encoding or self.settings.tap_encoding,
        )
        model = SPAModel(backbone, config, side)
        if body.setting in GATED_SETTINGS and gate is not None:
            weight, bias = _gate_tensors(gate, f.hidden_size)
            with torch.no_grad():
                model.gate.linear.weight.copy_(weight)
                model.gate.linear.bias.copy_(bias)
        return model

    def open_recommendation(self, device_id: str, body: RecommendSessionIn) -> RecommendSession:
        """A recommendation ranked by the backbone with the device's side network (over a
        session's event stream); validated like a session, capped with them."""
        f, limits = self.require_backbone(), self.settings
        deadline = body.deadline_s or min(limits.default_deadline_s, limits.max_deadline_s)
        if deadline > limits.max_deadline_s:
            raise ApiError(
                422,
                f"deadline_s {deadline:g} is over the limit {limits.max_deadline_s:g} "
                "(SPA_CLOUD_MAX_DEADLINE_S)",
            )
        rungs = training.check_rungs(body.rungs, f.num_layers)
        codes, draft = self.recommender().parts()
        model = self._device_model(codes.backbone, body, rungs, body.threshold, body.gate)
        config = RecommendConfig(strategy=body.strategy, k=body.k, gamma=body.gamma)
        session = RecommendSession(
            codes=codes,
            history=body.history,
            exclude_purchased=body.exclude_purchased,
            draft=draft,
            config=config,
            session_id=self._new_session_id(),
            device_id=device_id,
            model=model,
            prompt_ids=item_prompt(codes, body.history),
            decode=config.decode(codes.catalogue),
            deadline_s=deadline,
            strict=False,
            resume_s=limits.resume_s,
            records=self.records,
            on_end=self.registry.remove,
        )
        self.registry.add(session)  # 429 beyond the cap
        try:
            self.records.add_session(
                SessionRow(
                    id=session.id,
                    device_id=device_id,
                    setting=body.setting,
                    strategy=f"recommend-{body.strategy}",
                    strict=False,
                    threshold=body.threshold,
                    rungs=",".join(map(str, rungs)),
                    tap_dtype=model.config.wire_dtype,
                    deadline_s=deadline,
                    prompt_tokens=len(session.prompt_ids),
                    max_new_tokens=codes.codes.length,
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

    def _tap_mode(self, body: SessionIn, rungs: list[int], num_layers: int) -> str:
        """The session's tap mode: its own, else the server's default where the session can
        take it (run-ahead: spa without gate weights, greedy or sampling; no side: pull)."""
        mode = body.tap_mode or self.settings.tap_mode
        if body.setting not in SIDE_SETTINGS:
            return "pull"
        if mode == "run-ahead" and body.tap_mode is None:
            able = body.setting == "spa" and body.gate is None and body.decoding.strategy != "beam"
            mode = mode if able else "pull"
        if mode == "run-ahead" and rungs[-1] != num_layers:
            raise ApiError(
                422,
                f"run-ahead needs the last rung {num_layers} among the rungs: the device "
                "reads f(x) there",
            )
        return mode

    def batched(self) -> BatchedBackbone:
        """The backbone sessions decode with: its passes batched by the step scheduler."""
        with self.compute:
            if self._batched is None:
                s = self.settings
                scheduler = StepScheduler(
                    self.require_backbone(), self.compute, s.max_batch, s.batch_wait_s
                )
                self._batched = BatchedBackbone(self.require_backbone(), scheduler)
        return self._batched

    def scheduler_stats(self) -> Stats:
        """What the step scheduler did so far (all zero before the first session)."""
        return Stats() if self._batched is None else self._batched._scheduler.stats

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
            self._batched._scheduler.close()
        self.records.close()


def _gate_tensors(gate: GateIn, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate's weight [2, H] and bias [2] from lists or base64 fp32, checked."""

    def read(value: list | str, shape: tuple[int, ...], what: str) -> torch.Tensor:
        if isinstance(value, str):
            try:
                data = wire.b64decode(value, what=what)
                return wire.decode(data, "float32", shape, what=what)
            except wire.WireError as exc:
                raise ApiError(422, str(exc)) from None
        try:
            x = torch.tensor(value, dtype=torch.float32)
        except (ValueError, TypeError):
            raise ApiError(
                422, f"{what} must have shape {list(shape)}, got a ragged list"
            ) from None
        if tuple(x.shape) != shape:
            raise ApiError(422, f"{what} must have shape {list(shape)}, got {list(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ApiError(422, f"{what}: contains values too large for float32")
        return x

    return read(gate.weight, (2, hidden), "gate.weight"), read(gate.bias, (2,), "gate.bias")
