"""What can go wrong on a device, as exceptions whose message is meant for a person to read."""

from __future__ import annotations

from personalization.errors import SpaError


class DeviceError(SpaError):
    """Base class: the CLI and the UI show `str(error)` and nothing else."""


class CloudUnreachable(DeviceError):
    """No answer from the cloud (refused, timed out, or the connection broke mid-way)."""


class CloudError(DeviceError):
    """The cloud answered with an error status; `status` and its `detail` say why."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"the cloud refused the request ({status}): {detail}")
        self.status, self.detail = status, detail


class ProtocolMismatch(DeviceError):
    """The cloud speaks another protocol version than this device (see protocol/)."""


class StoreError(DeviceError):
    """The device directory is missing, not initialised, or of another schema version."""


class NotTrained(DeviceError):
    """A setting that needs the side network was asked for before any training run finished."""
