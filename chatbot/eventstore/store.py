"""The event store as the `eventsourcing` library builds it: the factories that the
application on this store constructs (application.py), wiring the parts below together.

- keys.py: per-user data keys, the key stores, erasure (crypto-shredding), the stored layout
- mapper.py: the cipher and the mapper that choose each event's key
- chain.py: the keyed hash chain and the PostgreSQL recorder that writes it
- snapshots.py: sealed snapshots (a MAC per row), the newest only
- group_commit.py: saves that share a transaction, and the bounds of one

Each module holds its own design notes.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import Mapper, StoredEvent, Transcoder
from eventsourcing.popo import POPOApplicationRecorder, POPOFactory
from eventsourcing.postgres import PostgresAggregateRecorder, PostgresFactory
from eventsourcing.utils import Environment

from chatbot.eventstore.chain import ChainedApplicationRecorder, chain_key_of
from chatbot.eventstore.keys import (
    DataErased,
    MemoryKeyStore,
    PostgresKeyStore,
    key_owner,
)
from chatbot.eventstore.mapper import KeyedCipher, KeyedMapper
from chatbot.eventstore.snapshots import SealedSnapshotRecorder
from chatbot.runtime.postgres import bound_sessions


class ChatStoreFactory(PostgresFactory):
    """PostgreSQL (the production store), with the keyed mapper, the chained event recorder
    and sealed snapshots. Needs `CIPHER_TOPIC` and `CIPHER_KEY` (the master key) and
    `CHAIN_KEY`."""

    def __init__(self, env: Environment) -> None:
        super().__init__(env)
        self.chain_key = chain_key_of(self.env)
        master = self.cipher()
        if master is None:
            raise OSError("per-user keys are wrapped by the master key: set CIPHER_TOPIC and CIPHER_KEY")
        self.master_cipher = master
        self.keys = PostgresKeyStore(self.datastore, base64.b64decode(self.env.get("CIPHER_KEY") or ""))
        bound_sessions(self.datastore)  # every statement ends within STATEMENT_TIMEOUT_S

    def _prefix(self) -> str:
        return self.env.name.lower() or "stored"

    def mapper(self, transcoder: Transcoder | None = None, mapper_class: Any = None) -> Mapper[Any]:
        return KeyedMapper(transcoder=transcoder or self.transcoder(), compressor=self.compressor(),
                           cipher=KeyedCipher(self.master_cipher, self.keys))

    def application_recorder(self) -> ChainedApplicationRecorder:
        recorder = ChainedApplicationRecorder(
            self.datastore, events_table_name=f"{self._prefix()}_events", chain_key=self.chain_key,
            snapshots_table_name=f"{self._prefix()}_snapshots" if self.is_snapshotting_enabled() else None,
        )
        if self.env_create_table():
            recorder.create_table()
        return recorder

    def aggregate_recorder(self, purpose: str = "events") -> PostgresAggregateRecorder:
        recorder = SealedSnapshotRecorder(
            self.datastore, events_table_name=f"{self._prefix()}_{purpose}", mac_key=self.chain_key,
        )
        if self.env_create_table():
            recorder.create_table()
        return recorder


# -- in memory --------------------------------------------------------------------------------


class MemoryKeyedRecorder(POPOApplicationRecorder):
    def __init__(self, keys: MemoryKeyStore) -> None:
        super().__init__()
        self.keys = keys

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        with self.keys.lock:
            erase_user = kwargs.pop("erase_user", None)
            if erase_user is not None:
                self.keys.rows[erase_user] = None
            for e in stored_events:
                owner = key_owner(e.state)
                if owner is not None:
                    if self.keys.rows.get(owner) is None:
                        raise DataErased(owner)
                    if e.originator_version == 1:
                        self.keys.directory.setdefault(e.originator_id, owner)
            return super().insert_events(stored_events, **kwargs)


class MemoryStoreFactory(POPOFactory):
    """The in-memory store (`StoredChatApplication(factory=MemoryStoreFactory)`, for tests) with
    per-user keys (no hash chain: that lives in the PostgreSQL recorder)."""

    def __init__(self, env: Environment) -> None:
        super().__init__(env)
        master = self.cipher()
        if master is None:
            raise OSError("per-user keys are wrapped by the master key: set CIPHER_TOPIC and CIPHER_KEY")
        self.master_cipher = master
        self.keys = MemoryKeyStore(base64.b64decode(self.env.get("CIPHER_KEY") or ""))

    def mapper(self, transcoder: Transcoder | None = None, mapper_class: Any = None) -> Mapper[Any]:
        return KeyedMapper(transcoder=transcoder or self.transcoder(), compressor=self.compressor(),
                           cipher=KeyedCipher(self.master_cipher, self.keys))

    def application_recorder(self) -> MemoryKeyedRecorder:
        return MemoryKeyedRecorder(self.keys)
