"""Leader/follower batching of blocking calls that many threads make at once.

A database round trip (and a commit's fsync) costs about the same for one row as for a
hundred. A caller that finds no batch under way leads: it takes what is queued (itself
included) and runs it as one batch; callers that arrive meanwhile queue and wait, and the
first of them leads the next batch. A caller alone runs at once, with no added wait.
Subclasses say how a batch is chosen (`take`) and run (`run`), and hand each item its own
result or error.

A caller may bound its wait (`wait_s`): if no batch has taken its item by then (the leader
is stuck, or the queue is long), the item leaves the queue unrun and the caller gets
`timed_out()`'s error; nothing of it was done. An item already taken into a batch is
waited for: its outcome is being decided, and the batch's own bounds end it.
"""

from __future__ import annotations

import threading
import time
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

    def submit(self, value: T, wait_s: float | None = None) -> R | None:
        item: Item[T, R] = Item(value)
        start = time.monotonic()
        with self.changed:
            self.queue.append(item)
        while True:
            with self.changed:
                while not item.done and self.running:
                    left = None if wait_s is None else start + wait_s - time.monotonic()
                    if left is not None and left <= 0 and item in self.queue:
                        self.queue.remove(item)  # never taken: give up, nothing was run
                        raise self.timed_out(time.monotonic() - start)
                    self.changed.wait(None if left is None or left <= 0 else left)
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

    def timed_out(self, waited_s: float) -> BaseException:
        """The error of a caller whose item no batch took within its `wait_s`."""
        return TimeoutError(f"not run within {waited_s:.1f} s")

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
