"""Session tokens: HMAC-signed (user id, expiry), so any API process verifies any token with
the shared secret and no session store. Sent as `Authorization: Bearer` or the cookie."""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
import time
from typing import Any
from uuid import UUID

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException

COOKIE = "session"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue_token(secret: bytes, user_id: UUID, ttl_s: int) -> str:
    payload = user_id.bytes + struct.pack(">Q", int(time.time()) + ttl_s)
    signature = hmac.new(secret, payload, hashlib.sha256).digest()
    return f"{_b64(payload)}.{_b64(signature)}"


def verify_token(secret: bytes, token: str) -> UUID | None:
    try:
        payload_b64, signature_b64 = token.split(".", 1)
        payload, signature = _unb64(payload_b64), _unb64(signature_b64)
    except (ValueError, TypeError):
        return None
    expected = hmac.new(secret, payload, hashlib.sha256).digest()
    if len(payload) != 24 or not hmac.compare_digest(signature, expected):
        return None
    (expires,) = struct.unpack(">Q", payload[16:])
    if expires < time.time():
        return None
    return UUID(bytes=payload[:16])


def token_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = connection.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return connection.cookies.get(COOKIE)


def user_of(connection: ASGIConnection[Any, Any, Any, Any], secret: bytes) -> UUID | None:
    token = token_of(connection)
    return verify_token(secret, token) if token else None


def require_user(connection: ASGIConnection[Any, Any, Any, Any], secret: bytes) -> UUID:
    user_id = user_of(connection, secret)
    if user_id is None:
        raise NotAuthorizedException("log in first: send a valid token or session cookie")
    return user_id
