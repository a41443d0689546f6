"""Leader/follower batching of blocking calls that many threads make at once.

A database round trip (and a commit's fsync) costs about the same for one row as for a
hundred. A caller that finds no batch under way leads: it takes what is queued (itself
included) and runs it as one batch; callers that arrive meanwhile queue and wait, and the
first of them leads the next batch. A caller alone runs at once, with no added wait.
Subclasses say how a batch is chosen (`take`) and run (`run`), and hand each item its own
result or error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class Item(Generic[T, R]):
    """One caller's request, waiting for its batch."""

    value: T
    answered: bool = False
    done: bool = False
    result: R | None = None
    error: BaseException | None = None

    def succeed(self, result: R | None) -> None:
        self.result, self.answered = result, True

    def fail(self, error: BaseException) -> None:
        self.error, self.answered = error, True

    def answer(self, call: Callable[[T], R | None]) -> None:
        """The outcome of `call(value)`, whichever it is."""
        try:
            self.succeed(call(self.value))
        except BaseException as e:  # noqa: BLE001 - handed to the caller it belongs to
            self.fail(e)


class Batcher(Generic[T, R]):
    def __init__(self) -> None:
        self.queue: list[Item[T, R]] = []
        self.running = False
        self.changed = threading.Condition()

    def submit(self, value: T) -> R | None:
        item: Item[T, R] = Item(value)
        with self.changed:
            self.queue.append(item)
        while True:
            with self.changed:
                while not item.done and self.running:
                    self.changed.wait()
                if item.done:
                    break
                self.running = True  # this caller leads the next batch
                batch = self.take()
            try:
                self._run(batch)  # perhaps without this caller's item: then it goes next
            finally:
                with self.changed:
                    self.running = False
                    self.changed.notify_all()
        if item.error is not None:
            raise item.error
        return item.result

    def take(self) -> list[Item[T, R]]:
        """The next batch, removed from the queue (never empty); by default all of it."""
        batch, self.queue = self.queue, []
        return batch

    def run(self, batch: list[Item[T, R]]) -> None:
        """Run the batch, calling `succeed` or `fail` on each item."""
        raise NotImplementedError

    def _run(self, batch: list[Item[T, R]]) -> None:
        try:
            self.run(batch)
        except BaseException as e:  # noqa: BLE001 - an error the batch did not hand out is everyone's
            for item in batch:
                if not item.answered:
                    item.fail(e)
        finally:
            for item in batch:
                if not item.answered:
                    item.fail(RuntimeError("the batch gave this item no answer"))
                item.done = True
