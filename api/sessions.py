"""Sessions that can be ended: one row per log-in, shared by every API process.

A log-in starts a session (a random id, in the token) and records it here with the time
and the browser's user agent, so a user can see where they are logged in and end any of
those sessions. Log-out ends the session it was made with; erasing an account ends all of
them. An ended session's id goes into this process's `REVOKED` at once (api/auth.py), and
every other process reads the ends it has not seen every REFRESH_S (one indexed query),
so a token of an ended session stops working everywhere within about a second, while a
request never waits on this table. Rows are operational state, not events: they hold no
conversation content, and an erased user's rows are deleted.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid4

from api.auth import REVOKED, Revocations
from projections.readmodels import ReadModelRecorder

REFRESH_S = 1.0
COMMIT_SLACK = timedelta(seconds=5)  # an end commits a little after its now(): look that far back
MAX_USER_AGENT = 200
SCHEMA = [
    """CREATE TABLE IF NOT EXISTS sessions (
        id uuid PRIMARY KEY, user_id uuid NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
        user_agent text NOT NULL DEFAULT '', ended_at timestamptz)""",
    "CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user_id)",
    "CREATE INDEX IF NOT EXISTS sessions_ended ON sessions (ended_at) WHERE ended_at IS NOT NULL",
]


class SessionStore:
    def __init__(self, readmodels: ReadModelRecorder, token_ttl_s: int, revoked: Revocations = REVOKED) -> None:
        self.readmodels = readmodels
        self.token_ttl_s = token_ttl_s
        self.revoked = revoked
        # ends up to this time were read; at start, every end young enough to matter
        self.seen_until = datetime.now(timezone.utc) - timedelta(seconds=token_ttl_s)

    def create_table(self) -> None:
        with self.readmodels.datastore.transaction(commit=True) as curs:
            for statement in SCHEMA:
                curs.execute(statement)

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        with self.readmodels.datastore.transaction(commit=True) as curs:
            curs.execute(sql, params)
            return curs.fetchall() if curs.description else []

    def start(self, user_id: UUID, user_agent: str = "") -> UUID:
        session_id = uuid4()
        self._rows("INSERT INTO sessions (id, user_id, user_agent) VALUES (%s, %s, %s)",
                   (session_id, user_id, user_agent.replace("\x00", "")[:MAX_USER_AGENT]))
        return session_id

    def end(self, user_id: UUID, session_id: UUID) -> bool:
        """End one of the user's sessions; False if it is not theirs or ended already."""
        rows = self._rows("UPDATE sessions SET ended_at = now() WHERE id = %s AND user_id = %s AND ended_at IS NULL"
                          " RETURNING id", (session_id, user_id))
        self.revoked.add([session_id])  # at once here, whatever the row said
        return bool(rows)

    def end_all(self, user_id: UUID) -> list[UUID]:
        rows = self._rows("UPDATE sessions SET ended_at = now() WHERE user_id = %s AND ended_at IS NULL RETURNING id",
                          (user_id,))
        ended = [r["id"] for r in rows]
        self.revoked.add(ended)
        return ended

    def forget(self, user_id: UUID) -> None:
        """An erased user: end their sessions, then drop their rows (the ends stay known
        in memory for the tokens' lifetime)."""
        self.end_all(user_id)
        self._rows("DELETE FROM sessions WHERE user_id = %s", (user_id,))

    def live(self, user_id: UUID) -> list[dict[str, Any]]:
        """The user's sessions that are neither ended nor expired, newest first."""
        return [dict(r) for r in self._rows(
            "SELECT id, created_at, user_agent FROM sessions WHERE user_id = %s AND ended_at IS NULL"
            " AND created_at > now() - make_interval(secs => %s) ORDER BY created_at DESC",
            (user_id, self.token_ttl_s),
        )]

    def refresh(self) -> int:
        """Read the ends recorded since the last look (by any process); returns how many."""
        since = self.seen_until
        rows = self._rows("SELECT id, ended_at FROM sessions WHERE ended_at > %s ORDER BY ended_at",
                          (since - COMMIT_SLACK,))
        self.revoked.add([r["id"] for r in rows])
        if rows:
            self.seen_until = max(since, rows[-1]["ended_at"])
        self.revoked.prune(time.time() - self.token_ttl_s)
        return len(rows)

