"""The demo's devices: one private device directory per demo user, plus the visitor's own, all
talking to the demo's cloud over HTTP.

Demo users are trained on first start (once per backbone, cached in the demo's directory), so a
fresh start shows device-coloured tokens without the visitor training anything. A device whose
token the cloud does not know (another cloud, a fresh cloud database) registers again; its
history and checkpoints stay.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from app.demo_users import DEMO_USERS, DemoUser, demo_user
from device_agent.agent import DeviceAgent
from device_agent.client import CloudClient
from device_agent.errors import CloudError, DeviceError
from device_agent.trainer import DeviceTrainConfig, Progress
from personalization.backbone.embedded import cache_dir
from personalization.config import DEFAULT_TAP_ENCODING, TapEncoding
from personalization.latency import NetworkProfile
from personalization.training.train import TrainConfig

MY_DEVICE = "me"  # the visitor's own device: empty until they add history and train


def default_root() -> Path:
    return cache_dir() / "demo"


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """How the demo users are trained on first start (the Device tab trains with its own).
    A demo wants the style to show after a few minutes of CPU: more epochs and a larger step
    than the paper's (its 15 epochs at ≤ 1e-3 leave 40 replies' style barely visible)."""

    epochs: int = 24
    lr: float = 5e-3
    target_usage: float = 0.7
    calibration_prompts: int = 4
    tap_encoding: TapEncoding = DEFAULT_TAP_ENCODING  # how the demo devices' taps cross the wire

    def fingerprint(self) -> str:
        """Demo users trained under another configuration are trained again."""
        return repr(self)

    def train_config(
        self,
        epochs: int | None = None,
        target_usage: float | None = None,
        tap_encoding: TapEncoding | None = None,
    ) -> DeviceTrainConfig:
        train = TrainConfig(
            epochs=epochs or self.epochs, lr=self.lr, target_usage=target_usage or self.target_usage
        )
        return DeviceTrainConfig(
            setting="spa",
            train=train,
            calibration_prompts=self.calibration_prompts,
            tap_encoding=tap_encoding or self.tap_encoding,
        )


@dataclass(frozen=True)
class DemoDecoding:
    """The page's default repetition controls: a 135M backbone steered by 40 replies loops
    without them (a sentence comes back again and again); no token 3-gram may repeat. The
    repetition penalty stays off: as in transformers it also penalises the prompt's tokens — the
    chat template's end-of-turn among them — so answers run past their natural end."""

    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 3


class Devices:
    """The demo's device directories under `root/<backbone>/`, for the cloud at `cloud_url`."""

    def __init__(self, root: Path, cloud_url: str, config: DemoConfig | None = None):
        self.cloud_url, self.config = cloud_url.rstrip("/"), config or DemoConfig()
        with CloudClient(self.cloud_url) as client:
            try:
                self.backbone = client.ready()
            except CloudError as exc:
                raise DeviceError(
                    f"the cloud at {self.cloud_url} is not ready: {exc.detail}"
                ) from None
        self.root = Path(root).expanduser() / self.backbone.replace("/", "--")
        self._locks = {key: threading.Lock() for key in self.users()}
        self._training: dict[str, str] = {}  # demo users not ready yet: key → where training is

    @staticmethod
    def users() -> list[str]:
        return [u.key for u in DEMO_USERS] + [MY_DEVICE]

    @staticmethod
    def label(key: str) -> str:
        if key == MY_DEVICE:
            return "my device (train it in the Device tab)"
        user = demo_user(key)
        return f"{user.name} — {user.style}"

    @staticmethod
    def example_prompts(key: str) -> list[str]:
        return [] if key == MY_DEVICE else list(demo_user(key).prompts)

    @staticmethod
    def example_prompt(key: str) -> str:
        return "" if key == MY_DEVICE else demo_user(key).prompts[0]

    def training(self, key: str) -> str | None:
        """Where `key`'s first training stands ("epoch 3/24"), while `prepare` has not finished
        it; None once the user is ready (or was never a demo user)."""
        return self._training.get(key)

    def lock(self, key: str) -> threading.Lock:
        """One user's device serves one request at a time (its store, its side network)."""
        return self._locks[key]

    def ensure(self, key: str) -> Path:
        """The device directory of `key`, created and registered with this cloud if needed."""
        if key not in self._locks:
            raise DeviceError(f"no such user {key!r}: {', '.join(self.users())}")
        root = self.root / key
        if not (root / "checkpoints").is_dir():
            shutil.rmtree(root, ignore_errors=True)  # a half-made directory from a crash
            name = "my device" if key == MY_DEVICE else demo_user(key).name
            with DeviceAgent.init(root, self.cloud_url, name) as agent:
                if key != MY_DEVICE:
                    agent.store.add_items(demo_user(key).items())
            return root
        with DeviceAgent(root, cloud_url=self.cloud_url) as agent:
            try:
                agent.client.info()
            except CloudError as exc:
                if exc.status != 401:
                    raise
                with CloudClient(self.cloud_url) as client:  # unknown here: register again
                    device_id, token = client.register(agent.store.get("name") or key)
                agent.store.set(device_id=device_id, token=token, cloud_url=self.cloud_url)
        return root

    def agent(self, key: str, profile: NetworkProfile | None = None) -> DeviceAgent:
        """An agent for `key`'s device (close it after use), over an emulated `profile` link."""
        return DeviceAgent(self.ensure(key), cloud_url=self.cloud_url, profile=profile)

    def prepare(self, on_progress: Callable[[str, Progress], None] | None = None) -> list[str]:
        """Train every demo user not yet trained under this configuration; returns their keys.
        While it runs (the demo runs it beside the page), `training` says where each user is."""
        trained = []
        self._training |= {user.key: "waiting for its turn" for user in DEMO_USERS}
        try:
            for user in DEMO_USERS:
                with self.lock(user.key), self.agent(user.key) as agent:
                    done = agent.store.current_checkpoint("spa") is not None
                    if done and agent.store.get("demo_config") == self.config.fingerprint():
                        self._training.pop(user.key, None)
                        continue
                    self._train(user, agent, on_progress)
                    agent.store.set(demo_config=self.config.fingerprint())
                    self._training.pop(user.key, None)
                    trained.append(user.key)
        finally:
            self._training.clear()
        return trained

    def _train(self, user: DemoUser, agent: DeviceAgent, on_progress) -> None:
        bar = tqdm(total=self.config.epochs, desc=f"training {user.name}", unit="epoch")

        def notify(p: Progress) -> None:
            self._training[user.key] = f"{p.stage} {p.done}/{p.total}"
            if p.stage == "epoch":
                bar.update(p.done - bar.n)
                bar.set_postfix(loss=f"{p.info['train']['lm']:.3f}")
            if on_progress is not None:
                on_progress(user.key, p)

        with bar:
            agent.train(self.config.train_config(), on_progress=notify)
