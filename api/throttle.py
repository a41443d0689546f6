"""Throttling of log-ins and registrations, shared by every API process.

Password guessing is slowed twice over: each client address may make at most
`auth_attempts_per_address` log-in and registration attempts in a window of WINDOW_S, and
each account may see at most `login_failures_per_account` failed log-ins in one (a correct
password then waits too, or a guesser would learn it was right). Counts live in
PostgreSQL, one upsert per attempt, like the message rate limit (api/limits.py), under
keys that are hashes (no address or e-mail in the table). Windows are fixed; a refusal says
when the window ends. Behind a reverse proxy every client would share the proxy's address:
name the proxy in `CHATBOT_TRUSTED_PROXIES` and the hop it adds to `X-Forwarded-For` is
used instead (deploy/nginx.conf adds it).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

from litestar import Request

from api.limits import Limited
from chatbot.runtime.metrics import RATE_LIMITED
from projections.readmodels import ReadModelRecorder

WINDOW_S = 15 * 60
SCHEMA = """CREATE TABLE IF NOT EXISTS auth_attempts (
    key text NOT NULL, window_start bigint NOT NULL, count int NOT NULL,
    PRIMARY KEY (key, window_start))"""
COUNT = """INSERT INTO auth_attempts VALUES (%s, %s, 1)
    ON CONFLICT (key, window_start) DO UPDATE SET count = auth_attempts.count + 1 RETURNING count"""
PEEK = "SELECT count FROM auth_attempts WHERE key = %s AND window_start = %s"


class TooManyAttempts(Exception):
    """Refused by the throttle: HTTP 429 with Retry-After."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _key(secret: bytes, kind: str, value: str) -> str:
    """The row's key: keyed, so a copy of the table cannot confirm a guessed address offline."""
    return hmac.new(secret, f"{kind}\x00{value.strip().lower()}".encode(), hashlib.sha256).hexdigest()


class AuthThrottle:
    def __init__(self, readmodels: ReadModelRecorder, per_address: int, failures_per_account: int,
                 secret: bytes = b"") -> None:
        self.readmodels = readmodels
        self.secret = secret  # the settings' secret key
        self.per_address = per_address  # 0: no limit
        self.failures_per_account = failures_per_account  # 0: no limit

    def create_table(self) -> None:
        with self.readmodels.datastore.transaction(commit=True) as curs:
            curs.execute(SCHEMA)

    def _window(self) -> tuple[int, int]:
        now = time.time()
        return int(now // WINDOW_S), int(WINDOW_S - now % WINDOW_S) + 1

    def _run(self, sql: str, key: str, window: int) -> int:
        with self.readmodels.datastore.transaction(commit=True) as curs:
            curs.execute(sql, (key, window))
            row: Any = curs.fetchone()
        return int(row["count"]) if row else 0

    def attempt(self, address: str) -> Limited | None:
        """Count one log-in or registration attempt from `address`."""
        if not self.per_address:
            return None
        window, retry_after = self._window()
        if self._run(COUNT, _key(self.secret, "address", address), window) > self.per_address:
            RATE_LIMITED.labels(limit="auth_attempts_per_address").inc()
            return Limited(f"too many log-in attempts from your address; try again in {retry_after // 60 + 1} "
                           "minutes", retry_after)
        return None

    def account_locked(self, email: str) -> Limited | None:
        """Whether the account has seen too many failed log-ins in this window."""
        if not self.failures_per_account:
            return None
        window, retry_after = self._window()
        if self._run(PEEK, _key(self.secret, "account", email), window) >= self.failures_per_account:
            RATE_LIMITED.labels(limit="login_failures_per_account").inc()
            return Limited(f"too many failed log-ins for this account; try again in {retry_after // 60 + 1} "
                           "minutes", retry_after)
        return None

    def failed(self, email: str) -> None:
        if self.failures_per_account:
            window, _ = self._window()
            self._run(COUNT, _key(self.secret, "account", email), window)


def client_address(request: Request[Any, Any, Any], settings: Any) -> str:
    """The client's address: the peer's, or, from a trusted reverse proxy, the last hop it
    added to X-Forwarded-For (earlier hops are the client's to write, so not believed)."""
    peer = request.client.host if request.client else ""
    if peer in settings.trusted_proxies:
        hops = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",") if h.strip()]
        return hops[-1] if hops else peer
    return peer


def refuse_if(limited: Limited | None) -> None:
    if limited is not None:
        raise TooManyAttempts(limited.message, retry_after=limited.retry_after)
