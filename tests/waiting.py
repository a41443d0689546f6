"""Waiting for what happens eventually (read models, metrics, logs, restarted processes): one
polling helper, sync (`eventually`) and async (`async_eventually`), instead of loops by hand.

The probe is called until `until(value)` holds for what it returns (by default: until the
value is truthy), and that value is returned. It is called at least once, then every
`interval` seconds; the last call falls on the deadline. An exception from the probe ends
the wait at once (an `assert` in it fails the test as it would in a loop), except those
named in `ignore`, which count as "not yet" (e.g. no leader for a moment).

At the deadline the wait fails with `NotInTime` (an AssertionError, so pytest reports a
failed test, and a TimeoutError to code that catches those), naming `what` it waited for
and the last value and error seen. With `fail=False` it returns the last value instead
(None if the probe never returned): a bounded wait that goes on either way, leaving the
judgement to the caller.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class NotInTime(AssertionError, TimeoutError):
    """What was waited for did not come within the time given."""


def _shown(value: object, limit: int = 1000) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


class _Wait:
    """The bookkeeping shared by the sync and async loops."""

    def __init__(self, timeout: float, interval: float, what: str, until: Callable[[Any], object],
                 ignore: tuple[type[BaseException], ...], fail: bool) -> None:
        self.timeout, self.interval, self.what, self.until = timeout, interval, what, until
        self.ignore, self.fail = ignore, fail
        self.deadline = time.monotonic() + timeout
        self.last: Any = None
        self.error: BaseException | None = None

    def seen(self, value: Any) -> bool:
        self.last, self.error = value, None
        return bool(self.until(value))

    def pause(self) -> float | None:
        """Seconds to sleep before the next try; None once the deadline has passed."""
        left = self.deadline - time.monotonic()
        return None if left <= 0 else min(self.interval, left)

    def give_up(self) -> Any:
        if not self.fail:
            return self.last
        seen = f"last value: {_shown(self.last)}"
        if self.error is not None:
            seen += f"; last error: {self.error!r}"
        raise NotInTime(f"waited {self.timeout:g} s for {self.what}; {seen}") from self.error


def eventually(probe: Callable[[], T], *, timeout: float, what: str, interval: float = 0.1,
               until: Callable[[T], object] = bool, ignore: tuple[type[BaseException], ...] = (),
               fail: bool = True) -> T:
    """`probe()` once `until` holds for it (see the module's docstring), sleeping in between."""
    wait = _Wait(timeout, interval, what, until, ignore, fail)
    while True:
        try:
            if wait.seen(value := probe()):
                return value
        except wait.ignore as e:
            wait.error = e
        pause = wait.pause()
        if pause is None:
            return wait.give_up()  # type: ignore[no-any-return]
        time.sleep(pause)


async def async_eventually(probe: Callable[[], T | Awaitable[T]], *, timeout: float, what: str,
                           interval: float = 0.1, until: Callable[[T], object] = bool,
                           ignore: tuple[type[BaseException], ...] = (), fail: bool = True) -> T:
    """`eventually` in an event loop: the probe may be sync or return an awaitable (a
    coroutine function, or a lambda calling one), and the pauses let other tasks run."""
    wait = _Wait(timeout, interval, what, until, ignore, fail)
    while True:
        try:
            value = probe()
            if inspect.isawaitable(value):
                value = await value
            if wait.seen(value):
                return value  # type: ignore[return-value]
        except wait.ignore as e:
            wait.error = e
        pause = wait.pause()
        if pause is None:
            return wait.give_up()  # type: ignore[no-any-return]
        await asyncio.sleep(pause)
