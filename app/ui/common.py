"""What every tab shares: branch colours and turning failures into readable messages."""

from __future__ import annotations

import functools
import inspect
import logging

import gradio as gr

from device_agent.errors import DeviceError

log = logging.getLogger("app.ui")

#: who produced a token: the backbone alone, the device's side network, or the backbone because
#: the device missed its deadline
BRANCH_COLORS = {
    "cloud": "#93c5fd",
    "device": "#fdba74",
    "correction": "#c4b5fd",  # run-ahead: the device replaced the backbone's draft
    "fallback": "#fca5a5",
}


def readable(handler):
    """Show a handler's failure as one readable message in the UI, never a stack trace: a
    `DeviceError` says what to do; anything else is logged with its traceback on the server."""

    def translate(exc: Exception) -> gr.Error:
        if isinstance(exc, gr.Error):
            return exc
        if isinstance(exc, DeviceError | ValueError):
            return gr.Error(str(exc))
        log.exception("handler %s failed", handler.__name__)
        return gr.Error(f"something went wrong ({type(exc).__name__}: {exc}); see the server log")

    if inspect.isgeneratorfunction(handler):

        @functools.wraps(handler)
        def stream(*args, **kwargs):
            try:
                yield from handler(*args, **kwargs)
            except Exception as exc:
                raise translate(exc) from None

        return stream

    @functools.wraps(handler)
    def call(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except Exception as exc:
            raise translate(exc) from None

    return call
