"""The retention job: records the expiry of temporary conversations that are due, and
discards chats started and left without a message for `empty_chat_ttl_s`.

It runs as a task inside every inference worker process (workers/inference.py: the
processes that hold the application to record what they do); a PostgreSQL advisory lock
taken per sweep lets only one of them work at a time. Each sweep reads the due conversations from
the read model and records `Expired` through the application, which checks the time again
against the events, so a stale read model can never expire a conversation early. The
projection then drops the conversation's rows like a deletion.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta

import psycopg

from chatbot.runtime.config import Settings
from domain.application import ChatApplication
from projections.readmodels import ReadModelRecorder

log = logging.getLogger("retention")
LOCK_KEY = 0x726574656E74  # "retent": one sweeper at a time


def sweep(app: ChatApplication, readmodels: ReadModelRecorder, empty_ttl: timedelta | None = None,
          stopping: Callable[[], bool] = lambda: False) -> int:
    """Expire every due conversation, and discard those left empty for `empty_ttl` (None:
    none), until `stopping()` says the process is stopping; returns how many went."""
    gone = 0
    due = [(app.expire_conversation, (c,)) for c in readmodels.due_expiries()]
    if empty_ttl is not None:
        due += [(app.discard_empty_conversation, (c, empty_ttl)) for c in readmodels.empty_conversations(empty_ttl)]
    for command, args in due:
        if stopping():
            break  # the next sweep, in this process or another, does the rest
        try:
            if command(*args):
                gone += 1
        except Exception:  # noqa: BLE001 - one conversation (erased, say) must not stop the rest
            log.exception("retention of conversation %s failed; the others go on", args[0])
    return gone


async def run(settings: Settings, app: ChatApplication, readmodels: ReadModelRecorder, stop: asyncio.Event) -> None:
    """Sweep every `retention_sweep_s` seconds until `stop` is set; never raises.

    The lock is a transaction's (`pg_try_advisory_xact_lock`), held by a transaction kept
    open for the sweep: it ends with the transaction however the sweep ends, and a pooler
    in transaction mode (PgBouncer in front of the workers) keeps the lock and its
    transaction on one server connection."""
    while not stop.is_set():
        try:
            async with await psycopg.AsyncConnection.connect(settings.pg_conninfo, connect_timeout=10) as conn:
                while not stop.is_set():
                    async with conn.transaction():
                        row = await (await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (LOCK_KEY,))).fetchone()
                        if row and row[0]:
                            empty_ttl = timedelta(seconds=settings.empty_chat_ttl_s) if settings.empty_chat_ttl_s else None
                            expired = await asyncio.to_thread(sweep, app, readmodels, empty_ttl, stop.is_set)
                            if expired:
                                log.info("expired or discarded %d conversations", expired)
                    try:
                        await asyncio.wait_for(stop.wait(), settings.retention_sweep_s)
                    except TimeoutError:
                        pass
        except Exception:  # noqa: BLE001 - PostgreSQL restarting: try again shortly
            log.exception("retention sweep failed; retrying")
            await asyncio.sleep(min(5.0, settings.retention_sweep_s))
