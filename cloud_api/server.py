"""Serving the application with uvicorn: from the command line, or in a background thread.

`serve(settings)` is what `spa cloud` / `spa-cloud` run. `ThreadedServer` runs a real uvicorn
server on 127.0.0.1 inside this process, on a socket it has already bound (so there is no race for
the port): for integration tests, benchmarks and the app's embedded cloud. It stops itself on exit.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from cloud_api.app import create_app
from cloud_api.settings import CloudSettings
from personalization.backbone.frozen import Backbone

GRACE_S = 3  # open event streams get this long to end when the server stops


def serve(settings: CloudSettings) -> None:
    """Run the cloud until interrupted (blocking)."""
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws="none",  # no websocket routes
        timeout_graceful_shutdown=GRACE_S,
        **tls(settings),
    )


def tls(settings: CloudSettings) -> dict:
    """uvicorn's TLS options: HTTPS where a certificate is given."""
    if settings.ssl_certfile is None:
        return {}
    return {"ssl_certfile": str(settings.ssl_certfile), "ssl_keyfile": str(settings.ssl_keyfile)}


class ThreadedServer:
    """`with ThreadedServer(settings) as server:` → a live server at `server.url`."""

    def __init__(
        self,
        settings: CloudSettings | None = None,
        backbone: Backbone | None = None,
        *,
        log_level: str = "warning",
    ):
        self.settings = settings or CloudSettings()
        self.app = create_app(self.settings, backbone)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((self.settings.host, self.settings.port))  # port 0: a free one
        self.host, self.port = self.socket.getsockname()[:2]
        config = uvicorn.Config(
            self.app,
            log_level=log_level,
            timeout_graceful_shutdown=GRACE_S,
            lifespan="on",
            ws="none",
            **tls(self.settings),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.ssl_certfile else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def cloud(self):
        return self.app.state.cloud

    def start(self, timeout: float = 30.0) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the cloud server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until the backbone is loaded (what /readyz reports)."""
        if not self.cloud.loaded.wait(timeout) or self.cloud.backbone is None:
            raise RuntimeError(f"the backbone did not load: {self.cloud.load_error}")

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=GRACE_S + 10)
        self.socket.close()

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
