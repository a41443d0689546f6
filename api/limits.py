"""Per-user rate limits and quotas that hold across every API process.

Messages per minute: a sliding window over per-minute counters in PostgreSQL, one upsert
per send (the API processes share nothing else, and the database is already on the send
path). A send's count is its place in the current minute plus the previous minute's count
weighted by the share of that minute still inside the last 60 s (`sliding_count`), so a
burst across a minute boundary is held to the limit too (a fixed window allowed twice it
within a few seconds there). Tokens per
day: the `rm_usage` read model, which the projector keeps from `ReplyCompleted` events, so
the quota lags a reply by the projector's few milliseconds. Both are one statement, sent
with its transaction in one round trip; the count commits without waiting for its fsync
(`synchronous_commit = off`): a crash of the database can forget the last few counts of
the current minute, and nothing else. Sends that arrive while a count is under way are
counted together, in one statement (chatbot/eventstore/batching.py): each still gets its own place
in its user's count, as if counted one by one.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass
from uuid import UUID

from chatbot.eventstore.batching import Batcher, Item
from chatbot.runtime.metrics import RATE_LIMITED
from projections.readmodels import ReadModelRecorder

SCHEMA = """CREATE TABLE IF NOT EXISTS rate_windows (
    user_id uuid NOT NULL, window_start bigint NOT NULL, count int NOT NULL,
    PRIMARY KEY (user_id, window_start))"""
WINDOW_S = 60
# Add n messages to each (user, window) and return the users' counts after them and (when
# asked) their tokens today, as `ReadModelRecorder.tokens_today` reads them. Rows are
# locked in key order, so two processes' batches cannot deadlock.
COUNT_AND_USAGE = """WITH counted AS (
    INSERT INTO rate_windows SELECT * FROM unnest(%s::uuid[], %s::bigint[], %s::int[]) AS t ORDER BY 1, 2
    ON CONFLICT (user_id, window_start) DO UPDATE SET count = rate_windows.count + EXCLUDED.count
    RETURNING user_id, window_start, count)
SELECT counted.*, coalesce((SELECT p.count FROM rate_windows p
    WHERE p.user_id = counted.user_id AND p.window_start = counted.window_start - 1), 0) AS previous,
    CASE WHEN %s::bool THEN coalesce((SELECT tokens FROM rm_usage u
    WHERE u.user_id = counted.user_id AND u.day = (now() AT TIME ZONE 'UTC')::date), 0) ELSE 0 END AS tokens
FROM counted"""


@dataclass(frozen=True)
class Limited:
    message: str
    retry_after: int  # seconds


def sliding_count(place: int, previous: int, elapsed: float) -> float:
    """A send's count over the last minute: its place in this minute's count plus the
    previous minute's count, weighted by the part of that minute (1 - elapsed) still within
    the last 60 s."""
    return place + previous * (1.0 - elapsed)


def retry_after(place: int, previous: int, elapsed: float, limit: int) -> int:
    """Seconds until `sliding_count` of a send like this one is back within `limit`."""
    if previous and place <= limit:
        # the previous minute's weight falls linearly: solve place + previous * (1 - e) <= limit
        wait = WINDOW_S * (1.0 - elapsed - (limit - place) / previous)
    else:  # this minute alone is over the limit: only the next minute helps
        wait = WINDOW_S * (1.0 - elapsed)
    return max(1, int(wait) + 1)


class WindowCounts(Batcher[tuple[UUID, int], tuple[int, int, int]]):
    """Counts (user, window) sends in batches; each send's answer is (its place in the
    user's count of the window, the user's count of the window before, tokens today)."""

    def __init__(self, readmodels: ReadModelRecorder, with_tokens: bool) -> None:
        super().__init__()
        self.readmodels, self.with_tokens = readmodels, with_tokens

    def run(self, batch: list[Item[tuple[UUID, int], tuple[int, int, int]]]) -> None:
        added = Counter(item.value for item in batch)
        keys = sorted(added)
        with self.readmodels.datastore.get_connection() as conn, conn.cursor() as curs:
            with conn.pipeline(), conn.transaction():  # BEGIN .. COMMIT in one round trip
                curs.execute("SET LOCAL synchronous_commit = off")
                curs.execute(COUNT_AND_USAGE, (
                    [u for u, _ in keys], [w for _, w in keys], [added[k] for k in keys], self.with_tokens,
                ), prepare=True)
                if random.random() < 0.01:  # now and then, forget old windows
                    conn.execute("DELETE FROM rate_windows WHERE window_start < %s", (keys[0][1] - 1,))
            rows = curs.fetchall()
        totals = {(r["user_id"], int(r["window_start"])): (int(r["count"]), int(r["previous"]), int(r["tokens"]))
                  for r in rows}
        assert set(totals) == set(added), "every (user, window) was counted"
        places = {k: totals[k][0] - n for k, n in added.items()}  # the count before this batch
        for item in batch:
            places[item.value] += 1
            item.succeed((places[item.value], *totals[item.value][1:]))


class RateLimiter:
    def __init__(self, readmodels: ReadModelRecorder, per_minute: int, tokens_per_day: int) -> None:
        self.readmodels = readmodels
        self.per_minute = per_minute
        self.tokens_per_day = tokens_per_day
        self.counts = WindowCounts(readmodels, with_tokens=bool(tokens_per_day))

    def create_table(self) -> None:
        with self.readmodels.datastore.transaction(commit=True) as curs:
            curs.execute(SCHEMA)

    def check_send(self, user_id: UUID) -> Limited | None:
        """Count one message against the user's limits; a `Limited` says when to retry."""
        now = time.time()
        counted = self.counts.submit((user_id, int(now // WINDOW_S)))
        assert counted is not None, "a count answers with a place and tokens"
        place, previous, tokens = counted
        elapsed = (now % WINDOW_S) / WINDOW_S
        if sliding_count(place, previous, elapsed) > self.per_minute:
            RATE_LIMITED.labels(limit="messages_per_minute").inc()
            return Limited(
                f"at most {self.per_minute} messages a minute; try again shortly",
                retry_after=retry_after(place, previous, elapsed, self.per_minute),
            )
        if self.tokens_per_day and tokens >= self.tokens_per_day:
            RATE_LIMITED.labels(limit="tokens_per_day").inc()
            return Limited(
                f"the daily quota of {self.tokens_per_day} tokens is used up; it resets at midnight UTC",
                retry_after=int(86400 - now % 86400) + 1,
            )
        return None
