"""A repository that keeps recently saved conversations and personas in memory.

Loading an aggregate reads its snapshot and its events, decrypts and decodes them; a
command on a cached one reads only the events stored after it (in any process), usually
none, so the event store stays the truth and optimistic concurrency still settles races.
Two kinds of entry:

- Checked out (conversations): `get` takes the entry out of the cache and hands that very
  object to the caller, who alone may change it; `save` puts it back once its events are
  stored. A failed save puts nothing back (the next `get` loads from the store), and two
  commands on one conversation at once never share an object: the second one loads.
- Shared (personas, read on every send by every user): the cache keeps a copy that is
  never changed; `get` hands out a copy of it, brought up to date, and `peek` the kept
  copy itself to read, checked against the store at most once every few hundred
  milliseconds.

Erased users: a hit on a conversation asks `readable(aggregate)` first (the key store's
answer, as fresh as a read of the events would be), so an erased user's conversation is
not served from memory either.

Bringing cached aggregates up to date is one read per aggregate; reads that arrive while
another is under way go together in one statement (`select_newer` of the recorder, where
it has one; batching.py).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from copy import deepcopy
from typing import Any
from uuid import UUID

from eventsourcing.application import ProjectorFunction, Repository, project_aggregate
from eventsourcing.persistence import EventStore

from chatbot.eventstore.batching import Batcher, Item

# Aggregates kept, conversations and personas together (least recently saved go first): an
# API process holds up to 10,000 sockets, and a short conversation is a few kilobytes.
CACHE_SIZE = 10_000


class NewerEvents(Batcher[tuple[UUID, int], list[Any]]):
    """The domain events of an aggregate after a version; requests that meet share a read."""

    def __init__(self, event_store: EventStore[UUID]) -> None:
        super().__init__()
        self.event_store = event_store

    def after(self, aggregate_id: UUID, version: int) -> list[Any]:
        return self.submit((aggregate_id, version)) or []

    def _one(self, request: tuple[UUID, int]) -> list[Any]:
        return list(self.event_store.get(originator_id=request[0], gt=request[1]))

    def run(self, batch: list[Item[tuple[UUID, int], list[Any]]]) -> None:
        select_newer = getattr(self.event_store.recorder, "select_newer", None)
        if select_newer is None or len(batch) == 1:
            for item in batch:
                item.answer(self._one)
            return
        lowest: dict[UUID, int] = {}
        for item in batch:
            aggregate_id, version = item.value
            lowest[aggregate_id] = min(lowest.get(aggregate_id, version), version)
        stored: dict[UUID, list[Any]] = defaultdict(list)
        for e in select_newer(lowest):
            stored[e.originator_id].append(e)
        to_domain_event = self.event_store.mapper.to_domain_event
        for item in batch:
            aggregate_id, version = item.value
            mine = [e for e in stored[aggregate_id] if e.originator_version > version]
            item.answer(lambda _, mine=mine: [to_domain_event(e) for e in mine])  # an erased key: this one's error


class CachingRepository(Repository[UUID]):
    def __init__(
        self,
        *args: Any,
        checked_out: tuple[type, ...] = (),
        shared: tuple[type, ...] = (),
        readable: Callable[[Any], None] = lambda aggregate: None,
        size: int = CACHE_SIZE,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        assert self.cache is None, "the library's own aggregate cache is off (AGGREGATE_CACHE_MAXSIZE)"
        self.checked_out, self.shared = checked_out, shared
        self.readable = readable  # raises if the aggregate may not be read any more
        self.size = size
        self.entries: OrderedDict[UUID, Any] = OrderedDict()
        self.checked: dict[UUID, float] = {}  # when `peek` last brought a shared entry up to date
        self.lock = threading.Lock()
        self.newer_events = NewerEvents(self.event_store)

    def get(
        self,
        aggregate_id: UUID,
        *,
        version: int | None = None,
        projector_func: ProjectorFunction[Any, Any] = project_aggregate,
        **kwargs: Any,
    ) -> Any:
        if version is not None:
            return super().get(aggregate_id, version=version, projector_func=projector_func, **kwargs)
        with self.lock:
            entry = self.entries.get(aggregate_id)
            if entry is not None and isinstance(entry, self.checked_out):
                del self.entries[aggregate_id]  # this caller's now
        if entry is None:
            aggregate = super().get(aggregate_id, projector_func=projector_func, **kwargs)
            if isinstance(aggregate, self.shared):
                self._keep(deepcopy(aggregate))
            return aggregate
        shared = isinstance(entry, self.shared)
        aggregate = deepcopy(entry) if shared else entry
        self.readable(aggregate)
        newer = self.newer_events.after(aggregate_id, aggregate.version)
        if newer:
            aggregate = projector_func(aggregate, newer)
            if shared:
                self._keep(deepcopy(aggregate))
        return aggregate

    def peek(self, aggregate_id: UUID, fresh_s: float) -> Any:
        """A shared aggregate to read, not to change: the cached copy itself, with no copy
        made and, if it was brought up to date less than `fresh_s` ago, no read of the
        store either. So a change made by another process shows within `fresh_s`; one
        made by this process, at once (`saved`)."""
        now = time.monotonic()
        with self.lock:
            entry = self.entries.get(aggregate_id)
            checked = self.checked.get(aggregate_id, 0.0)
        if entry is not None and isinstance(entry, self.shared) and now - checked < fresh_s:
            return entry
        aggregate = self.get(aggregate_id)  # up to date; a shared kind is kept as a copy
        with self.lock:
            self.checked[aggregate_id] = now
            if len(self.checked) > 2 * self.size:
                self.checked = {k: v for k, v in self.checked.items() if k in self.entries}
            kept = self.entries.get(aggregate_id)
        return kept if kept is not None and kept.version >= aggregate.version else aggregate

    def saved(self, aggregates: Iterable[Any]) -> None:
        """Aggregates whose events were just stored: keep them (a shared kind as a copy)."""
        for aggregate in aggregates:
            if isinstance(aggregate, self.checked_out):
                self._keep(aggregate)
            elif isinstance(aggregate, self.shared):
                self._keep(deepcopy(aggregate))

    def forget(self, aggregate_id: UUID) -> None:
        with self.lock:
            self.entries.pop(aggregate_id, None)

    def _keep(self, aggregate: Any) -> None:
        with self.lock:
            current = self.entries.get(aggregate.id)
            if current is not None and current.version > aggregate.version:
                return  # a newer state is kept already
            self.entries[aggregate.id] = aggregate
            self.entries.move_to_end(aggregate.id)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
