"""Who may use the cloud: bearer tokens per device (issued once, stored only as a SHA-256 hash,
rotated or revoked at will), the operator's token (registers devices where registration is
closed, revokes any device), and per-device rate limits (the `limits` library; 429 with
Retry-After)."""

from __future__ import annotations

import hashlib
import math
import secrets
import time
import uuid

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from limits import parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from cloud_api.db import DeviceRow
from cloud_api.settings import CloudSettings

bearer = HTTPBearer(auto_error=False, description="The token POST /v1/devices returned.")


def new_device_id() -> str:
    return uuid.uuid4().hex


def new_token() -> str:
    return "spa_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def revoked_hash() -> str:
    """A stored value no token hashes to (a SHA-256 hex digest never contains '-')."""
    return "revoked-" + uuid.uuid4().hex


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


class Access:
    """The operator's token and the per-device rate limits of one server."""

    def __init__(self, settings: CloudSettings):
        secret = settings.operator_token
        self.operator = secret.get_secret_value() if secret is not None else None
        self.registration = settings.registration_policy
        self.limits = parse_many(settings.rate_limits) if settings.rate_limits else []
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    def is_operator(self, credentials: HTTPAuthorizationCredentials | None) -> bool:
        return (
            self.operator is not None
            and credentials is not None
            and secrets.compare_digest(credentials.credentials, self.operator)
        )

    def require_operator(self, credentials: HTTPAuthorizationCredentials | None, what: str):
        if not self.is_operator(credentials):
            how = (
                "send the operator token as 'Authorization: Bearer <token>'"
                if self.operator
                else "this cloud has no operator token (spa cloud --operator-token)"
            )
            raise HTTPException(403, f"{what} needs the operator's token: {how}")

    def count(self, device_id: str) -> None:
        """One request of `device_id`; 429 with Retry-After once a limit is reached."""
        for limit in self.limits:
            if not self.limiter.test(limit, device_id):
                reset = self.limiter.get_window_stats(limit, device_id).reset_time
                wait = max(1, math.ceil(reset - time.time()))
                raise HTTPException(
                    429,
                    f"rate limit of {limit} requests per device reached: retry in {wait} s",
                    headers={"Retry-After": str(wait)},
                )
        for limit in self.limits:
            self.limiter.hit(limit, device_id)


def current_device(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
) -> DeviceRow:
    """The device a request comes from (401 without a valid bearer token; 429 over its rate
    limit)."""
    if credentials is None:
        raise _unauthorized(
            "missing bearer token: send 'Authorization: Bearer <token>' "
            "(POST /v1/devices issues one)"
        )
    device = request.app.state.cloud.records.device_by_token_hash(
        hash_token(credentials.credentials)
    )
    if device is None:
        raise _unauthorized("unknown or revoked bearer token")
    request.app.state.access.count(device.id)
    return device
