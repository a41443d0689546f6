"""Session tokens: HMAC-signed (user id, session id, expiry), so any API process verifies any
token with the shared secret, and checks it against the sessions ended (log-out, erasure,
"end this session"), which every process keeps in memory (api/sessions.py fills it), so no
request waits on a session store. Sent as `Authorization: Bearer` or the cookie."""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException

COOKIE = "session"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Session:
    user_id: UUID
    session_id: UUID


class Revocations:
    """The sessions ended (log-out, erasure, "end this session") that this process knows of:
    its own at once, other processes' within REFRESH_S (api/sessions.py polls the table).
    Only ends younger than the tokens' lifetime matter; older tokens have expired anyway."""

    def __init__(self) -> None:
        self._ended: dict[UUID, float] = {}
        self._lock = threading.Lock()

    def add(self, session_ids: list[UUID], at: float | None = None) -> None:
        now = time.time() if at is None else at
        with self._lock:
            for session_id in session_ids:
                self._ended.setdefault(session_id, now)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._ended

    def prune(self, older_than: float) -> None:
        with self._lock:
            self._ended = {s: t for s, t in self._ended.items() if t >= older_than}


REVOKED = Revocations()  # process-wide: every verification consults it


def issue_token(secret: bytes, user_id: UUID, ttl_s: int, session_id: UUID) -> str:
    payload = user_id.bytes + session_id.bytes + struct.pack(">Q", int(time.time()) + ttl_s)
    signature = hmac.new(secret, payload, hashlib.sha256).digest()
    return f"{_b64(payload)}.{_b64(signature)}"


def verify_token(secret: bytes, token: str) -> Session | None:
    """The session a token names, if its signature holds, it has not expired and the
    session was not ended. (Tokens of the earlier format, without a session, fail.)"""
    try:
        payload_b64, signature_b64 = token.split(".", 1)
        payload, signature = _unb64(payload_b64), _unb64(signature_b64)
    except (ValueError, TypeError):
        return None
    expected = hmac.new(secret, payload, hashlib.sha256).digest()
    if len(payload) != 40 or not hmac.compare_digest(signature, expected):
        return None
    (expires,) = struct.unpack(">Q", payload[32:])
    if expires < time.time():
        return None
    session = Session(UUID(bytes=payload[:16]), UUID(bytes=payload[16:32]))
    return None if session.session_id in REVOKED else session


def token_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = connection.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return connection.cookies.get(COOKIE)


def session_of(connection: ASGIConnection[Any, Any, Any, Any], secret: bytes) -> Session | None:
    token = token_of(connection)
    return verify_token(secret, token) if token else None


def user_of(connection: ASGIConnection[Any, Any, Any, Any], secret: bytes) -> UUID | None:
    session = session_of(connection, secret)
    return session.user_id if session else None


def require_session(connection: ASGIConnection[Any, Any, Any, Any], secret: bytes) -> Session:
    session = session_of(connection, secret)
    if session is None:
        raise NotAuthorizedException("log in first: send a valid token or session cookie")
    return session


def require_user(connection: ASGIConnection[Any, Any, Any, Any], secret: bytes) -> UUID:
    user_id = user_of(connection, secret)
    if user_id is None:
        raise NotAuthorizedException("log in first: send a valid token or session cookie")
    return user_id
