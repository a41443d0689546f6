"""Which Triton instance generates a reply: the one that holds its conversation's KV cache.

Design notes
- Each Triton instance keeps the KV entries of the conversations it served (the prefix
  cache, chatbot/inference/prefix_cache.py), so a conversation's next turn is fastest where its
  previous turn ran. `CHATBOT_TRITON_URL` may name several instances, comma-separated; a
  conversation's home instance is `partition_of(conversation id, instances)`, the same crc32
  rule that partitions the event stream, so every worker sends a conversation to the same
  instance without asking anyone.
- A miss is only slower, never wrong: an instance that cannot be reached is marked down for
  `DOWN_S` and its conversations go to the next instance in order (their prompts are simply
  prefilled in full there) until it answers again. When none can be reached, the worker
  waits for one (workers/inference.py, TRITON_WAIT_S) instead of failing the attempt. Only connection failures fail over;
  an error from a running instance (a bad request, a failed generation) is the request's own.
- One client per instance, for the worker's life (gRPC channels are reused).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from chatbot.bus.messaging import partition_of

DOWN_S = 5.0
RETIRE_S = 120.0  # a replaced connection stays open this long for the streams still on it
# what tritonclient's errors say when the server cannot be reached at all
_UNREACHABLE = ("StatusCode.UNAVAILABLE", "failed to connect", "Connection refused", "Socket closed")


def unreachable(error: BaseException | str) -> bool:
    text = str(error)
    return any(marker in text for marker in _UNREACHABLE)


class TritonRouter:
    def __init__(self, urls: tuple[str, ...], connect: Callable[[str], Any], clock: Callable[[], float] = time.monotonic) -> None:
        if not urls:
            raise ValueError("no Triton instance to route to (CHATBOT_TRITON_URL is empty)")
        self.urls = urls
        self._connect = connect
        self.clients = [connect(url) for url in urls]
        self._retired: list[tuple[float, Any]] = []  # (when to close, client) replaced by a reconnect
        self._down_until = [0.0] * len(urls)
        self._clock = clock

    @property
    def first(self) -> Any:
        """A client for calls that any instance answers alike (model readiness)."""
        return self.clients[0]

    def home(self, conversation_id: UUID | str) -> int:
        return partition_of(conversation_id, len(self.urls))

    def order(self, conversation_id: UUID | str) -> list[int]:
        """Instances to try for this conversation: its home first, then the next ones in
        turn; those marked down go last (they may have come back)."""
        start = self.home(conversation_id)
        ring = [(start + i) % len(self.urls) for i in range(len(self.urls))]
        now = self._clock()
        return [i for i in ring if self._down_until[i] <= now] + [i for i in ring if self._down_until[i] > now]

    async def mark_down(self, index: int) -> None:
        """The instance could not be reached: try it last for a while, and on a fresh
        connection (a gRPC channel that failed to connect waits longer and longer before it
        tries again, so a restarted server would otherwise go unused for seconds). The many
        requests that fail together reconnect once; the old channel is closed only after
        RETIRE_S, so no stream still running on it is cut."""
        now = self._clock()
        if self._down_until[index] > now:
            return  # marked down (and reconnected) already
        self._down_until[index] = now + DOWN_S
        old, self.clients[index] = self.clients[index], self._connect(self.urls[index])
        self._retired.append((now + RETIRE_S, old))
        await self._close_retired(now)

    async def _close_retired(self, now: float) -> None:
        due = [client for at, client in self._retired if at <= now]
        self._retired = [(at, client) for at, client in self._retired if at > now]
        for client in due:
            await client.close()

    def mark_up(self, index: int) -> None:
        self._down_until[index] = 0.0

    async def close(self) -> None:
        for client in [*self.clients, *(c for _, c in self._retired)]:
            await client.close()
        self._retired = []
