"""The write side in memory (eventsourcing's plain-old-Python-objects persistence)."""

from __future__ import annotations

import base64
import os
from uuid import UUID

import pytest

from domain.application import ChatApplication


@pytest.fixture
def app() -> ChatApplication:
    app = ChatApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}, max_message_chars=100)
    app.seed_personas()
    return app


@pytest.fixture
def keyed() -> ChatApplication:
    """In memory too, but with the production store's per-user keys, hash chain and
    compression (chatbot/eventstore/store.py)."""
    app = ChatApplication(env={
        "PERSISTENCE_MODULE": "chatbot.eventstore.store:MemoryStoreFactory",
        "CIPHER_TOPIC": "eventsourcing.cipher:AESCipher",
        "CIPHER_KEY": base64.b64encode(os.urandom(32)).decode(),
        "COMPRESSOR_TOPIC": "eventsourcing.compressor:ZlibCompressor",
    })
    app.seed_personas()
    return app


@pytest.fixture
def user(app: ChatApplication) -> UUID:
    """A registered user; the mixed case of the address is on purpose."""
    return app.register_user("Ada@Example.com", "correct horse")
