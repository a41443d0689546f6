"""Conversation -> Triton instance routing (workers/routing.py), with a fake clock."""

from __future__ import annotations

import uuid

import pytest

from chatbot.bus.messaging import partition_of
from workers.routing import DOWN_S, RETIRE_S, TritonRouter, unreachable

URLS = ("a:1", "b:2", "c:3")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Client:
    made = 0

    def __init__(self, url: str) -> None:
        Client.made += 1
        self.url, self.closed = url, False

    def __eq__(self, other: object) -> bool:
        return other == f"client {self.url}"

    async def close(self) -> None:
        self.closed = True


def router(clock: Clock | None = None) -> TritonRouter:
    return TritonRouter(URLS, connect=Client, clock=clock or Clock())


def test_a_conversation_always_goes_home_first_and_homes_spread() -> None:
    r = router()
    assert r.clients == ["client a:1", "client b:2", "client c:3"]
    homes = set()
    for _ in range(60):
        conversation = uuid.uuid4()
        order = r.order(conversation)
        assert order[0] == partition_of(conversation, 3) == r.home(conversation)
        assert sorted(order) == [0, 1, 2] and order == r.order(conversation)
        assert order == [(order[0] + i) % 3 for i in range(3)]
        homes.add(order[0])
    assert homes == {0, 1, 2}


async def test_an_unreachable_instance_goes_last_until_it_may_be_back_on_a_new_connection() -> None:
    clock = Clock()
    r = router(clock)
    conversation = next(c for c in (uuid.uuid4() for _ in range(100)) if r.home(c) == 1)
    old = r.clients[1]
    await r.mark_down(1)
    fresh = r.clients[1]
    assert fresh is not old and fresh == "client b:2"
    assert not old.closed, "streams still on the old connection run on"
    await r.mark_down(1)  # another request failing at the same time: one reconnect is enough
    assert r.clients[1] is fresh
    assert r.order(conversation) == [2, 0, 1]
    clock.now += DOWN_S + 0.1
    assert r.order(conversation) == [1, 2, 0]
    clock.now += RETIRE_S
    await r.mark_down(1)
    assert old.closed, "closed once its streams had time to end"
    r.mark_up(1)  # it answered after all
    assert r.order(conversation)[0] == 1


def test_only_connection_failures_count_as_unreachable() -> None:
    assert unreachable("[StatusCode.UNAVAILABLE] failed to connect to all addresses")
    assert unreachable(RuntimeError("Connection refused"))
    assert not unreachable("[StatusCode.INVALID_ARGUMENT] invalid request: prompt has 9000 tokens")
    with pytest.raises(ValueError, match="no Triton instance"):
        TritonRouter((), connect=str)
