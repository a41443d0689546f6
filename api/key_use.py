"""When each API key was last used: one row per key, shared by every API process.

A `/v1` request notes its key's use here, so its owner can tell a key still in use from one
that can go. The time only (no path, no address), and not as an event: an event per request
would bury the log under requests. A process writes a key's row at most once every
WRITE_EVERY_S (an in-memory "last written" map), so the time shown is up to a minute early,
and the write runs in the background, never in the request's way: a row that cannot be
written within STATEMENT_TIMEOUT_MS is skipped (and tried again by a later request). Rows are
operational state; an erased user's rows are deleted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from uuid import UUID

from projections.readmodels import ReadModelRecorder

log = logging.getLogger("api.keys")
WRITE_EVERY_S = 60.0
STATEMENT_TIMEOUT_MS = 2000  # bounds a write stuck behind a lock or a busy database
MAX_PENDING = 100  # writes in flight at once; beyond it a use is dropped, not queued
MAX_REMEMBERED = 10_000  # keys in the "last written" map before those of over a minute ago are dropped
SCHEMA = [
    """CREATE TABLE IF NOT EXISTS api_key_use (
        key_id text PRIMARY KEY, user_id uuid NOT NULL, last_used_at timestamptz NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS api_key_use_user ON api_key_use (user_id)",
]


class KeyUseStore:
    def __init__(self, readmodels: ReadModelRecorder, clock: Callable[[], float] = time.monotonic) -> None:
        self.readmodels = readmodels
        self.clock = clock
        self.written: dict[str, float] = {}  # key id -> when this process last wrote (or began to write) its row
        self.pending: set[asyncio.Task[None]] = set()
        # users erased through this process: a use noted after that writes nothing (bounded:
        # an erased user's key fails authentication soon after, so few requests arrive)
        self.forgotten: set[UUID] = set()

    def create_table(self) -> None:
        with self.readmodels.datastore.transaction(commit=True) as curs:
            for statement in SCHEMA:
                curs.execute(statement)

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        with self.readmodels.datastore.transaction(commit=True) as curs:
            curs.execute(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}")
            curs.execute(sql, params)
            return curs.fetchall() if curs.description else []

    def due(self, key_id: str) -> bool:
        """Whether this process should write the key's use now; if so, it is counted as
        written (so that the requests of the next minute do not write it again)."""
        now = self.clock()
        last = self.written.get(key_id)
        if last is not None and now - last < WRITE_EVERY_S:
            return False
        if len(self.written) > MAX_REMEMBERED:  # keys not written for a minute need no entry
            self.written = {k: t for k, t in self.written.items() if now - t < WRITE_EVERY_S}
        self.written[key_id] = now
        return True

    def record(self, user_id: UUID, key_id: str) -> None:
        """Write the key's use now (blocking: call it off the event loop)."""
        self._rows("INSERT INTO api_key_use (key_id, user_id, last_used_at) VALUES (%s, %s, now())"
                   " ON CONFLICT (key_id) DO UPDATE SET last_used_at = excluded.last_used_at", (key_id, user_id))

    def note(self, user_id: UUID, key_id: str, call: Callable[..., Awaitable[Any]]) -> None:
        """A request used the key: write it in the background if due (`call` runs a blocking
        function off the loop, as `Services.call` does). Returns at once."""
        if user_id in self.forgotten or len(self.pending) >= MAX_PENDING or not self.due(key_id):
            return
        task = asyncio.create_task(self._write(user_id, key_id, call))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _write(self, user_id: UUID, key_id: str, call: Callable[..., Awaitable[Any]]) -> None:
        try:
            await call(self.record, user_id, key_id)
        except Exception:  # noqa: BLE001 - a use not written is written by a later request
            self.written.pop(key_id, None)
            log.warning("could not record the use of an API key", exc_info=True)

    def last_used(self, user_id: UUID) -> dict[str, datetime]:
        """When each of the user's keys was last used (keys never used are absent)."""
        rows = self._rows("SELECT key_id, last_used_at FROM api_key_use WHERE user_id = %s", (user_id,))
        return {r["key_id"]: r["last_used_at"] for r in rows}

    def forget(self, user_id: UUID) -> None:
        """An erased user: their keys' rows go, and this process writes none again. (A
        write another process began just before may still land: the row holds a key id and
        a time, no content.)"""
        if len(self.forgotten) < MAX_REMEMBERED:
            self.forgotten.add(user_id)
        self._rows("DELETE FROM api_key_use WHERE user_id = %s", (user_id,))

    async def close(self, timeout: float = 2.0) -> None:
        """Let the writes in flight finish (within `timeout`), then cancel the rest: none
        may run on a closed pool."""
        if self.pending:
            _, late = await asyncio.wait(set(self.pending), timeout=timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)  # cancelled: they end at once
