"""The cipher and the mapper: each event encrypted under its user's data key (keys.py).

Which user an event belongs to is decided from the event: a user's own events name them
by their id; a conversation's `Started` (and an API key's `Created`) names its owner, and
the recorder (chain.py) writes `key_directory` (aggregate -> user) in the same transaction,
from which the mapper finds the owner of every later event and snapshot of that aggregate.
Events that belong to no user (personas, `User.Erased`) stay under the master key.
"""

from __future__ import annotations

import sys
from contextvars import ContextVar
from functools import lru_cache
from typing import Any
from uuid import UUID

from eventsourcing.cipher import AESCipher
from eventsourcing.domain import Snapshot
from eventsourcing.persistence import (
    Cipher,
    Compressor,
    Mapper,
    MapperDeserialisationError,
    StoredEvent,
    Transcoder,
)
from eventsourcing.utils import resolve_topic

from chatbot.eventstore.keys import (
    HEADER,
    MAGIC,
    DataErased,
    DataKey,
    KeyStore,
    key_owner,
)
from chatbot.runtime.tracing import stamp
from domain.conversation import Conversation
from domain.transfer import ImportRecord
from domain.user import ApiKey, User

# The aggregates whose events belong to a user, and the field of their first event that
# names that user (None: the aggregate is the user).
PERSONAL: dict[type, str | None] = {User: None, Conversation: "owner_id", ApiKey: "user_id", ImportRecord: "owner_id"}

_OWNER: ContextVar[UUID | None] = ContextVar("owner", default=None)


class KeyedCipher(Cipher):
    """Encrypts under the key of the user being mapped (else the master cipher); decrypts
    with whichever key the stored bytes name."""

    def __init__(self, master: Cipher, keys: KeyStore) -> None:
        # eventsourcing's AESCipher under the master key writes what the master DataKey
        # writes, and reads what it reads: use the faster one
        same = isinstance(master, AESCipher) and master.key == keys.master.key
        self.master: Cipher | DataKey = keys.master if same else master
        self.keys = keys

    def encrypt(self, plaintext: bytes) -> bytes:
        owner = _OWNER.get()
        if owner is None:
            return self.master.encrypt(plaintext)
        return MAGIC + owner.bytes + self.keys.key_for(owner, create=True).encrypt(plaintext)

    def decrypt(self, ciphertext: bytes) -> bytes:
        owner = key_owner(ciphertext)
        if owner is None:
            return self.master.decrypt(ciphertext)
        return self.keys.key_for(owner).decrypt(ciphertext[HEADER:])


@lru_cache(maxsize=None)
def aggregate_class(event_class: type) -> type | None:
    """The aggregate class an event class is nested in (`Conversation.Started` ->
    `Conversation`), or None."""
    outer = event_class.__qualname__.split(".", 1)[0]
    cls = getattr(sys.modules.get(event_class.__module__), outer, None)
    return cls if isinstance(cls, type) and cls is not event_class else None


class KeyedMapper(Mapper[UUID]):
    """The library's mapper, choosing the key per event (see the module's notes)."""

    def __init__(self, transcoder: Transcoder, compressor: Compressor | None = None,
                 cipher: Cipher | None = None) -> None:
        assert isinstance(cipher, KeyedCipher), "a KeyedMapper encrypts with a KeyedCipher"
        super().__init__(transcoder, compressor, cipher)
        self.keys: KeyStore = cipher.keys

    def owner(self, event: Any) -> UUID | None:
        """Whose key encrypts `event` (None: the master key)."""
        if isinstance(event, Snapshot):
            aggregate = resolve_topic(event.topic)
        else:
            aggregate = aggregate_class(type(event))
        if aggregate not in PERSONAL:
            return None
        if aggregate is User:
            return None if isinstance(event, User.Erased) else event.originator_id
        if event.originator_version == 1 and not isinstance(event, Snapshot):
            owner = getattr(event, PERSONAL[aggregate] or "", None)
            if isinstance(owner, UUID):
                self.keys.remember(event.originator_id, owner)
                return owner
        # None for an aggregate begun before per-user keys: it stays under the master key
        return self.keys.owner_of(event.originator_id)

    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        stamp(domain_event, type(domain_event).__qualname__)  # its trace context, as metadata (chatbot/runtime/tracing.py)
        token = _OWNER.set(self.owner(domain_event))
        try:
            return super().to_stored_event(domain_event)
        finally:
            _OWNER.reset(token)

    def to_domain_event(self, stored_event: StoredEvent) -> Any:
        try:
            return super().to_domain_event(stored_event)
        except MapperDeserialisationError as e:
            if isinstance(e.__cause__, DataErased):
                raise e.__cause__ from None
            raise
