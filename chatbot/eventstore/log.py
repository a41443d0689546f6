"""`EventLog`: the event store's notification log, as the relay and the projector read it.

Those processes follow the log (every stored event, in notification order) and decode
events; they record nothing through the application. So they get this small object, built
from the settings by `event_log` (application.py) or, in a process that has the application
anyway, over the application's own store (`StoredChatApplication.event_log`): the newest
notification id, the notifications after a position, an event decrypted and decoded, and
the key store, whose keys also seal the read models' text (projections/sealing.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import (
    ApplicationRecorder,
    Mapper,
    Notification,
    StoredEvent,
)
from eventsourcing.postgres import PostgresApplicationRecorder

from chatbot.eventstore.keys import KeyStore


class EventLog:
    """Reads the notification log of one store; `close` closes the store, if this log owns it."""

    def __init__(self, recorder: ApplicationRecorder, mapper: Mapper[UUID], keys: KeyStore,
                 close: Callable[[], None] | None = None) -> None:
        self.recorder = recorder
        self.mapper = mapper
        self.keys = keys
        self._close = close

    def head(self) -> int:
        """The newest notification id (0: nothing stored yet)."""
        return self.recorder.max_notification_id() or 0

    def read(self, after: int, limit: int) -> Sequence[Notification]:
        """Up to `limit` notifications after notification id `after`, in order."""
        return self.recorder.select_notifications(after, limit, inclusive_of_start=False)

    def decode(self, stored: StoredEvent) -> Any:
        """The domain event of a stored event or notification (decrypted under its user's key:
        DataErased for an erased user's)."""
        return self.mapper.to_domain_event(stored)

    @property
    def channel(self) -> str:
        """The PostgreSQL channel every insert notifies (`LISTEN` wakes on new events)."""
        assert isinstance(self.recorder, PostgresApplicationRecorder), "only PostgreSQL notifies"
        return self.recorder.channel_name

    def close(self) -> None:
        if self._close is not None:
            self._close()
