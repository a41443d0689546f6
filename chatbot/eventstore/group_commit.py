"""Group commit: saves that arrive together share one transaction, within bounds.

Group commit. The recorder (chain.py) locks the events table for each insert (so
notification ids are committed in order, with no gaps a reader could pass over) and commits
with an fsync, so inserts are serialized by that lock. Saves that arrive while another is committing
wait and go in together, in one transaction (one lock, one fsync), led by the first of
them; the first of a quiet process's saves goes at once. A batch never holds two saves of
one aggregate. A batch that fails on a conflict (another process saved first) or on an
erased key is undone whole, and each of its saves is then tried alone, so each gets the
outcome it would have had alone.

Bounds (chatbot/runtime/postgres.py). A batch holds at most GROUP_COMMIT_MAX_EVENTS events and
GROUP_COMMIT_MAX_BYTES stored bytes; an event over MAX_EVENT_BYTES is refused (the broker
could never carry it); a save still queued after GROUP_COMMIT_WAIT_S leaves the queue
unsaved with `WriteTimeout`; every statement is flushed whole (psycopg's pipeline mode
would leave a big one half-sent and wait for good) and runs under the session's statement
and lock timeouts, and a timed-out insert is not tried again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from eventsourcing.persistence import IntegrityError, StoredEvent

from chatbot.eventstore.batching import Batcher, Item
from chatbot.eventstore.keys import DataErased
from chatbot.runtime.metrics import GROUP_COMMIT_EVENTS, GROUP_COMMIT_SAVES
from chatbot.runtime.postgres import WriteTimeout

GROUP_COMMIT_MAX_EVENTS = 1000  # the most events one group commit inserts
GROUP_COMMIT_MAX_BYTES = 4 << 20  # ... and the most stored bytes (a big save goes alone)
GROUP_COMMIT_WAIT_S = 30.0  # the longest a save waits for its turn before it is refused
MAX_EVENT_BYTES = 6 << 20  # one stored event; JetStream takes messages of up to 8 MB


class EventTooLarge(ValueError):
    """A stored event over MAX_EVENT_BYTES: the broker could never carry it."""


class GroupCommit(Batcher[Sequence[StoredEvent], Sequence[int]]):
    """Saves that arrive while another commits go in together, in one transaction
    (batching.py); `commit` inserts events and returns their notification ids."""

    def __init__(self, commit: Callable[[Sequence[StoredEvent]], Sequence[int] | None],
                 max_events: int = GROUP_COMMIT_MAX_EVENTS, max_bytes: int = GROUP_COMMIT_MAX_BYTES,
                 wait_s: float = GROUP_COMMIT_WAIT_S) -> None:
        super().__init__()
        self.commit = commit
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.wait_s = wait_s

    def insert(self, events: Sequence[StoredEvent]) -> Sequence[int] | None:
        return self.submit(events, wait_s=self.wait_s)

    def timed_out(self, waited_s: float) -> BaseException:
        return WriteTimeout(f"the event store did not take this save within {waited_s:.0f} s; nothing was saved")

    def take(self) -> list[Item[Sequence[StoredEvent], Sequence[int]]]:
        """The oldest queued saves, no two of one aggregate, up to `max_events` events and
        `max_bytes` stored bytes (the oldest always: a big save goes alone)."""
        batch: list[Item[Sequence[StoredEvent], Sequence[int]]] = []
        rest: list[Item[Sequence[StoredEvent], Sequence[int]]] = []
        seen: set[Any] = set()
        size = nbytes = 0
        for item in self.queue:
            originators = {e.originator_id for e in item.value}
            item_bytes = sum(len(e.state) for e in item.value)
            if batch and (size + len(item.value) > self.max_events or nbytes + item_bytes > self.max_bytes
                          or not seen.isdisjoint(originators)):
                rest.append(item)
                continue
            batch.append(item)
            seen |= originators
            size += len(item.value)
            nbytes += item_bytes
        self.queue = rest
        return batch

    def run(self, batch: list[Item[Sequence[StoredEvent], Sequence[int]]]) -> None:
        GROUP_COMMIT_SAVES.observe(len(batch))
        GROUP_COMMIT_EVENTS.observe(sum(len(item.value) for item in batch))
        if len(batch) == 1:
            batch[0].answer(self.commit)
            return
        try:
            ids = self.commit([e for item in batch for e in item.value])
        except (IntegrityError, DataErased):
            for item in batch:  # one of them spoilt the transaction: each alone
                item.answer(self.commit)
            return
        assert ids is not None and len(ids) == sum(len(i.value) for i in batch), "an id per event"
        start = 0
        for item in batch:
            item.succeed(list(ids[start:start + len(item.value)]))
            start += len(item.value)
