"""The write side in memory (eventsourcing's plain-old-Python-objects persistence)."""

from __future__ import annotations

from uuid import UUID

import pytest

from domain.application import ChatApplication


@pytest.fixture
def app() -> ChatApplication:
    app = ChatApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}, max_message_chars=100)
    app.seed_personas()
    return app


@pytest.fixture
def user(app: ChatApplication) -> UUID:
    """A registered user; the mixed case of the address is on purpose."""
    return app.register_user("Ada@Example.com", "correct horse")
