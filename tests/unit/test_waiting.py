"""The tests' one polling helper (tests/waiting.py): the value once it is there, a failure
naming what was awaited and the last value and error seen, or the last value when asked."""

from __future__ import annotations

import itertools
import time

import pytest

from tests.waiting import NotInTime, async_eventually, eventually


def test_the_value_once_the_probe_returns_a_true_one() -> None:
    counter = itertools.count()
    assert eventually(lambda: next(counter) >= 3 and "there", timeout=5, interval=0, what="the third try") == "there"
    assert eventually(lambda: [1, 2], until=lambda v: len(v) == 2, timeout=0, what="two") == [1, 2]


def test_at_the_deadline_it_fails_naming_what_and_the_last_value_and_error() -> None:
    started = time.monotonic()
    with pytest.raises(NotInTime, match=r"waited 0.2 s for the answer; last value: \[\]") as failed:
        eventually(lambda: [], timeout=0.2, interval=0.05, what="the answer")
    assert 0.2 <= time.monotonic() - started < 1
    assert isinstance(failed.value, AssertionError) and isinstance(failed.value, TimeoutError)

    def no_leader() -> str:
        raise ConnectionError("no leader")

    with pytest.raises(NotInTime, match=r"last error: ConnectionError\('no leader'\)"):
        eventually(no_leader, timeout=0.1, interval=0.05, what="a leader", ignore=(ConnectionError,))
    with pytest.raises(ConnectionError):  # not ignored: it ends the wait at once
        eventually(no_leader, timeout=5, what="a leader")


def test_without_failing_it_returns_the_last_value() -> None:
    assert eventually(lambda: 0, timeout=0.1, interval=0.05, what="nothing", fail=False) == 0


async def test_the_async_probe_may_be_sync_or_awaitable() -> None:
    async def answer() -> int:
        return 42

    assert await async_eventually(answer, timeout=1, what="the answer") == 42
    assert await async_eventually(lambda: answer(), until=lambda v: v == 42, timeout=1, what="the answer") == 42
    assert await async_eventually(lambda: "sync", timeout=1, what="a sync value") == "sync"
    with pytest.raises(NotInTime, match="for 42 from a sync probe; last value: 41"):
        await async_eventually(lambda: 41, until=lambda v: v == 42, timeout=0.1, interval=0.05,
                               what="42 from a sync probe")
