"""`spa demo` / `spa-demo`: the cloud API (a real uvicorn server, unless a remote one is given),
the demo users' devices (trained on first start, cached), and the Gradio UI — with every process
it started stopped when it ends (Ctrl-C or SIGTERM)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from app import demo_catalogue
from app.cloud_process import cloud
from app.devices import DemoConfig, Devices, default_root


@dataclass(frozen=True)
class DemoSettings:
    backbone: str = "smollm2"
    host: str = "127.0.0.1"
    port: int = 7860
    cloud_url: str | None = None  # a remote cloud instead of starting one
    root: Path = field(default_factory=default_root)  # devices, the cloud's records, runs
    config: DemoConfig = field(default_factory=DemoConfig)


def say(message: str) -> None:
    print(f"[spa demo] {message}", flush=True)


@contextlib.contextmanager
def _cloud(settings: DemoSettings, items: Path) -> Iterator[str]:
    """The demo's cloud: the remote one given, else `spa cloud` started here for the block."""
    if settings.cloud_url is not None:
        yield settings.cloud_url
        return
    work = settings.root.expanduser() / "cloud"
    say(f"starting the cloud API (backbone {settings.backbone}); log: {work / 'cloud.log'}")
    with cloud(settings.backbone, work, catalogue=items) as url:
        yield url


@contextlib.contextmanager
def demo_devices(settings: DemoSettings) -> Iterator[Devices]:
    """The demo's devices on its cloud, every demo user trained (`spa device serve --demo`)."""
    items, _ = demo_catalogue.write(settings.root.expanduser() / "shop")
    with _cloud(settings, items) as url:
        devices = Devices(settings.root, url, settings.config)
        trained = devices.prepare()
        say(f"demo users ready ({'trained now: ' + ', '.join(trained) if trained else 'cached'})")
        yield devices


def serve(settings: DemoSettings, *, prepare_only: bool = False) -> None:
    """Run the demo until interrupted (or, with `prepare_only`, train the demo users and stop:
    the Docker build's step)."""
    started = time.monotonic()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    root = settings.root.expanduser()
    items, histories = demo_catalogue.write(root / "shop")  # the Recommend tab's own shop
    with contextlib.ExitStack() as stack:
        devices = Devices(root, stack.enter_context(_cloud(settings, items)), settings.config)
        url = devices.cloud_url
        say(f"cloud API at {url} (spec: {url}/docs), backbone {devices.backbone}")
        say(f"devices in {devices.root}; training the demo users that are not trained yet")

        def prepare() -> None:
            trained = devices.prepare()
            done = "trained now: " + ", ".join(trained) if trained else "cached"
            say(f"demo users ready ({done}) {time.monotonic() - started:.0f} s after start")
            if settings.cloud_url is None:  # a remote cloud recommends from its own catalogue
                shop = root / "shop"
                if train_shop_target(settings.backbone, items, histories, shop):
                    say(f"shop recommender ready {time.monotonic() - started:.0f} s after start")
                else:
                    say(f"training the shop's recommender failed: see {shop / 'train.log'}")

        if prepare_only:
            prepare()
            return
        # The page first, the demo users' training beside it: a fresh machine shows the page
        # minutes sooner, and a user still training says so on the page until it is ready.
        threading.Thread(target=prepare, daemon=True, name="demo-users").start()
        from app.ui import build  # gradio is slow to import: only when serving

        page = build(devices, root, histories)
        page.queue(default_concurrency_limit=4)
        page.launch(
            server_name=settings.host,
            server_port=settings.port,
            prevent_thread_lock=True,
            ssr_mode=False,
            quiet=True,
        )
        stack.callback(page.close)
        shown = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        say(
            f"UI ready at http://{shown}:{settings.port} in {time.monotonic() - started:.0f} s "
            "(Ctrl-C stops the UI and the cloud)"
        )
        with contextlib.suppress(KeyboardInterrupt):
            while not stop.wait(1):
                pass
        say("stopping")


def train_shop_target(backbone: str, items: Path, histories: Path, work: Path) -> bool:
    """`spa train-target` on the demo shop (cached after the first time); its output goes to
    `work/train.log`. True when the target is ready."""
    command = [
        sys.executable,
        "-c",
        "from app.cli import main; main()",
        "train-target",
        str(histories),
        "--catalogue",
        str(items),
        "--backbone",
        backbone,
    ]
    with (work / "train.log").open("w") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode == 0
