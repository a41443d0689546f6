"""One-time set-up that is safe to repeat: tables, the event stream, built-in personas."""

from __future__ import annotations

import asyncio
import logging

import nats

from chatbot.bus.messaging import ensure_stream
from chatbot.eventstore.application import chat_application
from chatbot.runtime.config import Settings
from projections.readmodels import read_model_recorder

log = logging.getLogger(__name__)


async def _ensure_stream(settings: Settings) -> None:
    nc = await nats.connect(settings.nats_servers)
    try:
        await ensure_stream(nc.jetstream(), settings.stream_name, settings.stream_replicas)
    finally:
        await nc.drain()


def bootstrap(settings: Settings) -> None:
    app = chat_application(settings, create_tables=True)  # the event table
    app.seed_personas()
    app.close()
    recorder = read_model_recorder(settings.eventsourcing_env(create_tables=True))  # and read models
    from api.key_use import KeyUseStore
    from api.limits import RateLimiter
    from api.sessions import SessionStore
    from api.throttle import AuthThrottle

    RateLimiter(recorder, settings.messages_per_minute, settings.tokens_per_day).create_table()
    AuthThrottle(recorder, settings.auth_attempts_per_address, settings.login_failures_per_account).create_table()
    SessionStore(recorder, settings.token_ttl_s).create_table()
    KeyUseStore(recorder).create_table()
    plaintext = recorder.holds_plaintext()
    recorder.datastore.close()
    if plaintext:  # read models of a version before sealed text: replay them, sealed
        from projections.rebuild import rebuild

        report = rebuild(settings, progress=False)
        log.info("read models rebuilt with sealed text: %d events in %.1f s", report.events, report.seconds)
    asyncio.run(_ensure_stream(settings))
