"""Admission: a session request checked against the backbone and the server's limits, and turned
into what a session runs — its prompt ids, decoding, deadline, tap mode and the cloud's half of
the device's model. Every refusal is an `ApiError` naming the field and the limit."""

from __future__ import annotations

import secrets

import torch

from cloud_api import training
from cloud_api.errors import ApiError
from cloud_api.settings import CloudSettings
from personalization.backbone.frozen import Backbone
from personalization.config import (
    GATED_SETTINGS,
    SIDE_SETTINGS,
    DecodeConfig,
    SideConfig,
    SPAConfig,
)
from personalization.model import SPAModel
from protocol import wire
from protocol.messages import DecodingIn, GateIn, RecommendSessionIn, SessionIn


def prompt_ids(f: Backbone, body: SessionIn, limits: CloudSettings) -> list[int]:
    """The prompt's token ids: a conversation or text through the tokenizer, or ids checked."""
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
    return prompt


def decode_config(decoding: DecodingIn, limits: CloudSettings) -> DecodeConfig:
    """The decoding asked for, within the token limit; sampling without a seed gets one (it is
    reported, so the device can replay the run)."""
    max_new_tokens = decoding.max_new_tokens or min(64, limits.max_new_tokens)
    if max_new_tokens > limits.max_new_tokens:
        raise ApiError(
            422,
            f"decoding.max_new_tokens {max_new_tokens} is over the limit "
            f"{limits.max_new_tokens} (SPA_CLOUD_MAX_NEW_TOKENS)",
        )
    seed = decoding.seed
    if decoding.strategy == "sample" and seed is None:
        seed = secrets.randbelow(2**31)
    return DecodeConfig(
        strategy=decoding.strategy,
        max_new_tokens=max_new_tokens,
        temperature=decoding.temperature,
        top_p=decoding.top_p,
        seed=seed,
        num_beams=decoding.num_beams,
        repetition_penalty=decoding.repetition_penalty,
        no_repeat_ngram_size=decoding.no_repeat_ngram_size,
    )


def deadline(asked: float | None, limits: CloudSettings) -> float:
    """How long the session waits for g(x): the device's ask, else the server's default."""
    value = asked or min(limits.default_deadline_s, limits.max_deadline_s)
    if value > limits.max_deadline_s:
        raise ApiError(
            422,
            f"deadline_s {value:g} is over the limit {limits.max_deadline_s:g} "
            "(SPA_CLOUD_MAX_DEADLINE_S)",
        )
    return value


def tap_mode(body: SessionIn, rungs: list[int], num_layers: int, default: str) -> str:
    """The session's tap mode: its own, else the server's default where the session can take it
    (run-ahead: spa without gate weights, greedy or sampling; no side network: pull)."""
    mode = body.tap_mode or default
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


def device_model(
    backbone,
    body: SessionIn | RecommendSessionIn,
    rungs: list[int],
    threshold: float,
    limits: CloudSettings,
) -> SPAModel:
    """The cloud's half of a device's model: the backbone, the gate's weights (when sent, and
    not in strict mode), and a width-1 side network that carries only the rungs and the dtype
    (the cloud never runs g)."""
    H = backbone.hidden_size
    side = SideConfig(hidden_size=H, num_layers=backbone.num_layers, rungs=rungs, reduction=H)
    config = SPAConfig(
        setting=body.setting,
        threshold=threshold,
        wire_dtype=body.tap_dtype or limits.tap_dtype,
        tap_encoding=body.tap_encoding or limits.tap_encoding,
    )
    model = SPAModel(backbone, config, side)
    gate = None if getattr(body, "strict", False) else body.gate
    if body.setting in GATED_SETTINGS and gate is not None:
        weight, bias = gate_tensors(gate, H)
        with torch.no_grad():
            model.gate.linear.weight.copy_(weight)
            model.gate.linear.bias.copy_(bias)
    return model


def gate_tensors(gate: GateIn, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
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
