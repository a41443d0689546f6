"""The retention job: records the expiry of temporary conversations that are due.

It runs as a task inside every projector process; a PostgreSQL advisory lock taken per
sweep lets only one of them work at a time. Each sweep reads the due conversations from
the read model and records `Expired` through the application, which checks the time again
against the events, so a stale read model can never expire a conversation early. The
projection then drops the conversation's rows like a deletion.
"""

from __future__ import annotations

import asyncio
import logging

import psycopg

from chatbot.config import Settings
from domain.application import ChatApplication
from projections.readmodels import ReadModelRecorder

log = logging.getLogger("retention")
LOCK_KEY = 0x726574656E74  # "retent": one sweeper at a time


def sweep(app: ChatApplication, readmodels: ReadModelRecorder) -> int:
    """Expire every due conversation; returns how many expired."""
    expired = 0
    for conversation_id in readmodels.due_expiries():
        try:
            if app.expire_conversation(conversation_id):
                expired += 1
        except Exception:  # noqa: BLE001 - one conversation (erased, say) must not stop the rest
            log.exception("expiring conversation %s failed; the others go on", conversation_id)
    return expired


async def run(settings: Settings, app: ChatApplication, readmodels: ReadModelRecorder, stop: asyncio.Event) -> None:
    """Sweep every `retention_sweep_s` seconds until `stop` is set; never raises."""
    while not stop.is_set():
        try:
            async with await psycopg.AsyncConnection.connect(settings.pg_conninfo, autocommit=True) as conn:
                while not stop.is_set():
                    row = await (await conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,))).fetchone()
                    if row and row[0]:
                        try:
                            expired = await asyncio.to_thread(sweep, app, readmodels)
                        finally:
                            await conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
                        if expired:
                            log.info("expired %d temporary conversations", expired)
                    try:
                        await asyncio.wait_for(stop.wait(), settings.retention_sweep_s)
                    except TimeoutError:
                        pass
        except Exception:  # noqa: BLE001 - PostgreSQL restarting: try again shortly
            log.exception("retention sweep failed; retrying")
            await asyncio.sleep(min(5.0, settings.retention_sweep_s))
