"""The application as every process builds it from its settings (`chat_application`, the
composition root), and the event log that the relay and the projector read (`event_log`).

The domain's application (domain/application.py) is plain eventsourcing: it runs on the
library's in-memory store as it is. `StoredChatApplication` wires in what is infrastructure,
in code rather than by a `PERSISTENCE_MODULE` string:

- the store (store.py): PostgreSQL with per-user keys, the hash chain and sealed snapshots,
  or its in-memory twin for tests (`factory=MemoryStoreFactory`);
- the caching repository (aggregate_cache.py), which every save keeps up to date, and whose
  hits on a conversation ask the key store whether its owner was erased (`_readable`);
- snapshots of conversations every `SNAPSHOT_INTERVAL` events, of any state JSON can hold
  (state_snapshot.py);
- the event log (log.py) over this application's own store, for a process that has the
  application anyway.

Its name stays "chat": the name names the tables (`chat_events`, `chat_snapshots`) and the
environment's prefix. `chat_application` adds what the commands ask of the rest of the
system: the models the repository serves, and the prompt window of the worker's prompt
builder (one way of counting a prompt, chatbot/inference/prompt.py).

The composition root is here, not in chatbot/runtime/: the event store builds on the
runtime (its settings, PostgreSQL sessions, tracing, metrics), so the runtime cannot build
on the event store without a cycle between the two packages (tests/unit/test_layout.py).
"""

from __future__ import annotations

import os
from typing import Any
from uuid import UUID

from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    JSONTranscoder,
    UUIDAsHex,
)
from eventsourcing.utils import Environment

from chatbot.eventstore.aggregate_cache import CachingRepository
from chatbot.eventstore.keys import KeyStore
from chatbot.eventstore.log import EventLog
from chatbot.eventstore.state_snapshot import StateSnapshot, register_state_transcodings
from chatbot.eventstore.store import ChatStoreFactory, MemoryStoreFactory
from chatbot.inference.prompt import PromptBuilder
from chatbot.inference.repository import served_models
from chatbot.runtime.config import Settings
from domain.application import ChatApplication
from domain.conversation import Conversation
from domain.persona import Persona

# A conversation is snapshotted every this many events (only the newest snapshot is kept),
# so loading a long one reads its snapshot and at most this many events after it.
SNAPSHOT_INTERVAL = 100


class StoredChatApplication(ChatApplication):
    """`ChatApplication` on `factory` (PostgreSQL by default), with the caching repository,
    state snapshots and the key store's say on what may still be read."""

    name = "chat"  # set again: the library names a subclass after its class otherwise
    snapshotting_intervals = {Conversation: SNAPSHOT_INTERVAL}  # type: ignore[dict-item]

    factory: ChatStoreFactory | MemoryStoreFactory

    def __init__(self, env: dict[str, str] | None = None, *,
                 factory: type[ChatStoreFactory | MemoryStoreFactory] = ChatStoreFactory, **kwargs: Any) -> None:
        self.factory_class = factory
        super().__init__(env, **kwargs)

    def construct_factory(self, env: Environment) -> ChatStoreFactory | MemoryStoreFactory:
        return self.factory_class(env)

    @property
    def keys(self) -> KeyStore:
        """The store's per-user data keys (keys.py)."""
        return self.factory.keys

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)  # the library's: UUID, Decimal, datetime
        register_state_transcodings(transcoder)  # what snapshots of aggregate state need

    def construct_repository(self) -> CachingRepository:
        """Conversations and personas stay in memory between commands (aggregate_cache.py)."""
        return CachingRepository(
            self.events, snapshot_store=self.snapshots,
            checked_out=(Conversation,), shared=(Persona,), readable=self._readable,
        )

    def _forget_user(self, user_id: UUID) -> None:
        self.keys.forget(user_id)  # the key cached in this process goes with the stored one

    def _readable(self, aggregate: Any) -> None:
        """Raise AccountErased (DataErased) for a cached conversation whose owner's key is gone."""
        if isinstance(aggregate, Conversation):
            owner = self.keys.owner_of(aggregate.id)
            if owner is not None:
                self.keys.key_for(owner)

    def save(self, *objs: Any, **kwargs: Any) -> Any:
        """The library's; then the saved conversations and personas are cached. A method
        does not change an aggregate after saving it (another command may have it then)."""
        recordings = super().save(*objs, **kwargs)
        repository = self.repository
        if isinstance(repository, CachingRepository):
            repository.saved(objs)
        return recordings

    def take_snapshot(self, aggregate_id: UUID, version: int | None = None, **kwargs: Any) -> None:
        """The library's, with a snapshot class that carries any state JSON can hold."""
        assert self.snapshots is not None, "snapshotting is off (IS_SNAPSHOTTING_ENABLED)"
        aggregate = self.repository.get(aggregate_id, version=version, **kwargs)
        self.snapshots.put([StateSnapshot.take(aggregate)])

    def event_log(self) -> EventLog:
        """The notification log of this application's store, sharing its connections; it
        closes with the application, not on its own."""
        return EventLog(self.recorder, self.mapper, self.keys)


def chat_application(settings: Settings, create_tables: bool = False) -> StoredChatApplication:
    return StoredChatApplication(
        env=settings.eventsourcing_env(create_tables), max_message_chars=settings.max_message_chars,
        served_models=lambda: served_models(settings.model_repository),
        prompt_window=PromptBuilder(settings.model_repository),
    )


def event_log(settings: Settings) -> EventLog:
    """The notification log of the store `chat_application(settings)` writes, without the
    application, on a connection pool of its own, closed with the log."""
    return store_event_log(settings.eventsourcing_env())


def store_event_log(env: dict[str, str], *,
                    factory: type[ChatStoreFactory | MemoryStoreFactory] = ChatStoreFactory) -> EventLog:
    """The log of the store `StoredChatApplication(env, factory=factory)` has: its recorder,
    and its mapper (the same transcodings, the same keys)."""
    store = factory(Environment(StoredChatApplication.name, {**os.environ, **env}))  # as the application reads it
    transcoder = store.transcoder()
    assert isinstance(transcoder, JSONTranscoder)
    for transcoding in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO()):  # the library's, as the application's
        transcoder.register(transcoding)
    register_state_transcodings(transcoder)
    return EventLog(store.application_recorder(), store.mapper(transcoder), store.keys, close=store.close)
