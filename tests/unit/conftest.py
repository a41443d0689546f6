"""The write side in memory: the application on the event store's in-memory twin
(chatbot/eventstore/application.py), with the caching repository and state snapshots."""

from __future__ import annotations

import base64
import os
from uuid import UUID

import pytest

from chatbot.eventstore.application import StoredChatApplication
from chatbot.eventstore.store import MemoryStoreFactory
from domain.application import ChatApplication
from tests.fakes import tokenizer  # noqa: F401 - the tiny tokenizer, a fixture for every unit test


def memory_env(**env: str) -> dict[str, str]:
    """What the in-memory store needs: a master key for the per-user keys it wraps."""
    return {"CIPHER_TOPIC": "eventsourcing.cipher:AESCipher",
            "CIPHER_KEY": base64.b64encode(os.urandom(32)).decode(), **env}


@pytest.fixture
def app() -> ChatApplication:
    app = StoredChatApplication(env=memory_env(), factory=MemoryStoreFactory, max_message_chars=100)
    app.seed_personas()
    return app


@pytest.fixture
def keyed() -> StoredChatApplication:
    """In memory too, with the production store's per-user keys and compression
    (chatbot/eventstore/store.py)."""
    app = StoredChatApplication(env=memory_env(COMPRESSOR_TOPIC="eventsourcing.compressor:ZlibCompressor"),
                                factory=MemoryStoreFactory)
    app.seed_personas()
    return app


@pytest.fixture
def user(app: ChatApplication) -> UUID:
    """A registered user; the mixed case of the address is on purpose."""
    return app.register_user("Ada@Example.com", "correct horse")
