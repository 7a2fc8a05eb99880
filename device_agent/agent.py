"""`DeviceAgent`: one user's device — its store, its connection to the cloud, its side network.

What the CLI, the Gradio app and the Flower client use: `init` registers with the cloud and
creates the store; `train` fits the side network on the local history; `generate` streams tokens
through the cloud with the current checkpoint, logs the generation and its accounting.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx

from device_agent.client import ClientConfig, CloudClient
from device_agent.errors import DeviceError, NotTrained, StoreError
from device_agent.generation import RemoteGeneration
from device_agent.purchases import CodeBook
from device_agent.store import Store
from device_agent.trainer import DeviceTrainConfig, Progress, frozen_head, start_model, train_device
from personalization.backbone.embedded import cache_dir
from personalization.config import GATED_SETTINGS, SERVED_SETTINGS, DecodeConfig, TapMode
from personalization.latency import Measured, NetworkProfile, WhatIf, what_if
from personalization.model import SPAModel
from personalization.side import count_parameters
from personalization.training.checkpoint import load_checkpoint, read_checkpoint

#: what a device can ask the cloud for (lora / adapter live inside the backbone's layers)


def default_dir() -> Path:
    """Where `spa device` keeps its store unless told (--dir or SPA_DEVICE_DIR)."""
    return cache_dir() / "device"


class DeviceAgent:
    """An initialised device directory plus a client for the cloud it registered with."""

    def __init__(
        self,
        root: str | Path,
        *,
        cloud_url: str | None = None,
        profile: NetworkProfile | None = None,
        client_config: ClientConfig | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        self.store = Store(root)
        url = cloud_url or self.store.get("cloud_url")
        self.client = CloudClient(
            url, self.store.get("token"), profile=profile, config=client_config, transport=transport
        )
        self._model: tuple[int, SPAModel] | None = None  # (checkpoint id, model)

    @classmethod
    def init(
        cls,
        root: str | Path,
        cloud_url: str,
        name: str | None = None,
        *,
        database_url: str | None = None,
        **kwargs,
    ) -> DeviceAgent:
        """Register a new device with the cloud and create its store at `root`."""
        if (Path(root).expanduser() / "checkpoints").is_dir():
            raise StoreError(f"{root} already holds a device; use another --dir or remove it")
        name = name or socket.gethostname()
        with CloudClient(cloud_url, transport=kwargs.get("transport")) as client:
            device_id, token = client.register(name)
        meta = {"device_id": device_id, "token": token, "name": name, "cloud_url": cloud_url}
        Store.create(root, meta, database_url).close()
        return cls(root, **kwargs)

    def close(self) -> None:
        self.client.close()
        self.store.close()

    def __enter__(self) -> DeviceAgent:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- training ------------------------------------------------------------------------------
    def train(
        self,
        cfg: DeviceTrainConfig | None = None,
        *,
        resume: bool = False,
        warm: bool = False,
        initial: dict | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        progress: bool = False,
    ):
        run = train_device(
            self.store,
            self.client,
            cfg,
            resume=resume,
            warm=warm,
            initial=initial,
            on_progress=on_progress,
            progress=progress,
        )
        self._model = None
        return run

    def starting_model(self, cfg: DeviceTrainConfig, initial: dict | None = None) -> SPAModel:
        """What a warm training run of `cfg` would start from: the newest checkpoint of its
        setting, else the seeded initialisation every device shares; then `initial`."""
        codes = CodeBook.fetch(self.client) if cfg.target == "codes" else None
        head = frozen_head(self.client, self.store, codes)
        return start_model(self.store, head, cfg, True, initial or {}).eval()

    def model(self, setting: str | None = None) -> SPAModel:
        """The side network (and gate) of the newest checkpoint — of `setting`, if given — on
        the frozen head."""
        checkpoint = self.store.current_checkpoint(setting)
        if checkpoint is None:
            trained = ", ".join(sorted({c.setting for c in self.store.checkpoints()})) or "none"
            which = f" --setting {setting}" if setting else ""
            raise NotTrained(
                f"this device has no trained side network{which.replace(' --', ' for ')} yet "
                f"(trained: {trained}); run `spa device train{which}`"
            )
        if self._model is None or self._model[0] != checkpoint.id:
            path = self.store.path(checkpoint.path)
            info = read_checkpoint(path)[0]  # trained on item codes: their head, not the text's
            codes = None
            if info.vocab_size != self.client.facts().vocab_size:
                codes = CodeBook.fetch(self.client)
            head = frozen_head(self.client, self.store, codes)
            model, _info, _optim = load_checkpoint(path, head)
            self._model = (checkpoint.id, model.eval())
        return self._model[1]

    # ---- generation ----------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[int] | list[dict[str, str]],
        *,
        setting: str | None = None,
        decode: DecodeConfig | None = None,
        strict: bool = False,
        threshold: float | None = None,
        deadline_s: float | None = None,
        tap_mode: TapMode | None = None,
        model: SPAModel | None = None,
        chat: bool = True,
    ) -> RemoteGeneration:
        """A streaming generation (iterate it); logged in the store when it ends, however.
        `prompt`: text (wrapped in the chat template unless `chat` is off), token ids, or a
        conversation of {role, content} turns."""
        if setting is not None and setting not in SERVED_SETTINGS:
            raise DeviceError(
                f"unknown setting {setting!r}; choose one of {', '.join(SERVED_SETTINGS)}"
            )
        if setting == "base":
            model = None
        else:  # `model`: other weights than the store's newest (a federated round's)
            model = model or self.model(setting)
            setting = model.setting
            if threshold is not None:
                model.config = replace(model.config, threshold=threshold)
        profile = self.client.link.profile
        return RemoteGeneration(
            self.client,
            model,
            prompt,
            setting,
            decode or DecodeConfig(),
            strict=strict,
            tap_mode=tap_mode,
            deadline_s=deadline_s,
            chat=chat,
            on_end=lambda g: self.store.log_generation(
                session_id=g.session.session_id if g.session else "",
                setting=g.setting,
                strict=g.strict,
                profile=profile.name if profile else "",
                prompt=str(g.prompt),
                text=g.text,
                status=g.status,
                error=g.error,
                totals=g.accounts.summary(),
                tokens=[vars(t) for t in g.tokens],
            ),
        )

    def what_if(self, generation: RemoteGeneration, net: NetworkProfile) -> list[WhatIf]:
        """Paper Table 2 for every setting under `net`, from this generation's measurements."""
        info, a = self.client.info(), generation.accounts
        model = generation.model or self.model()
        contacts = [t for t in generation.tokens if t.contacts]
        side_params, gate_params = count_parameters(model.side), count_parameters(model.gate)
        tau = net.rtt_s
        if contacts:  # measured: network time per contact minus its bytes' serialisation
            tau = sum(
                t.net_s / t.contacts
                - net.transfer_s(t.bytes_to_device, t.bytes_from_device) / t.contacts
                for t in contacts
            ) / len(contacts)
        n = max(a.tokens, 1)
        measured = Measured(
            t_cloud=a.t_cloud / n,
            t_side=a.t_device / max(a.tap_positions, 1),
            tau=max(tau, 0.0),
            usage=a.m
            if generation.setting in GATED_SETTINGS
            else (self.store.current_checkpoint().usage or 0.5),
            num_layers=info.num_layers,
            hidden_size=info.hidden_size,
            wire_bytes=model.wire_bytes,
            # measured: what one tap position cost on the wire (encoding, base64, JSON framing)
            tap_bytes=a.bytes_to_device / a.tap_positions if a.tap_positions else model.tap_bytes,
            backbone_parameters=info.parameters["backbone"],
            corrections=a.corrections / n if generation.tap_mode == "run-ahead" else None,
            parameters={
                "lora": info.parameters["lora"],
                "adapter": info.parameters["adapter"],
                "lst": side_params,
                "full": side_params,
                "choice": side_params + gate_params,
                "spa": side_params + gate_params,
            },
        )
        return what_if(measured, net)

    # ---- status --------------------------------------------------------------------------------
    def status(self) -> dict:
        s = self.store
        checkpoint, runs = s.current_checkpoint(), s.runs()
        return {
            "dir": str(s.root),
            "device_id": s.get("device_id"),
            "name": s.get("name"),
            "cloud_url": self.client.url,
            "history_items": len(s.items()),
            "runs": len(runs),
            "last_run": None
            if not runs
            else {
                "id": runs[-1].id,
                "setting": runs[-1].setting,
                "status": runs[-1].status,
                "epochs_done": runs[-1].epochs_done,
                "error": runs[-1].error,
            },
            "checkpoint": None
            if checkpoint is None
            else {
                "path": checkpoint.path,
                "setting": checkpoint.setting,
                "parameters": checkpoint.parameters,
                "parameters_pct": round(checkpoint.parameters_pct, 4),
                "threshold": checkpoint.threshold,
                "target_usage": checkpoint.target_usage,
                "usage": checkpoint.usage,
            },
            "generations": len(s.generations(limit=1_000_000)),
        }
