"""Bearer tokens per device: issued once at registration, stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import secrets
import uuid

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cloud_api.db import DeviceRow

bearer = HTTPBearer(auto_error=False, description="The token POST /v1/devices returned.")


def new_device_id() -> str:
    return uuid.uuid4().hex


def new_token() -> str:
    return "spa_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


def current_device(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
) -> DeviceRow:
    """The device a request comes from (401 without a valid bearer token)."""
    if credentials is None:
        raise _unauthorized(
            "missing bearer token: send 'Authorization: Bearer <token>' "
            "(POST /v1/devices issues one)"
        )
    device = request.app.state.cloud.records.device_by_token_hash(
        hash_token(credentials.credentials)
    )
    if device is None:
        raise _unauthorized("unknown bearer token")
    return device
