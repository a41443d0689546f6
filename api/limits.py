"""Per-user rate limits and quotas that hold across every API process.

Messages per minute: a fixed-window counter in PostgreSQL, one upsert per send (the API
processes share nothing else, and the database is already on the send path). Tokens per
day: the `rm_usage` read model, which the projector keeps from `ReplyCompleted` events, so
the quota lags a reply by the projector's few milliseconds.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from uuid import UUID

from projections.readmodels import ReadModelRecorder

SCHEMA = """CREATE TABLE IF NOT EXISTS rate_windows (
    user_id uuid NOT NULL, window_start bigint NOT NULL, count int NOT NULL,
    PRIMARY KEY (user_id, window_start))"""
WINDOW_S = 60


@dataclass(frozen=True)
class Limited:
    message: str
    retry_after: int  # seconds


class RateLimiter:
    def __init__(self, readmodels: ReadModelRecorder, per_minute: int, tokens_per_day: int) -> None:
        self.readmodels = readmodels
        self.per_minute = per_minute
        self.tokens_per_day = tokens_per_day

    def create_table(self) -> None:
        with self.readmodels.datastore.transaction(commit=True) as curs:
            curs.execute(SCHEMA)

    def check_send(self, user_id: UUID) -> Limited | None:
        """Count one message against the user's limits; a `Limited` says when to retry."""
        now = time.time()
        window = int(now // WINDOW_S)
        with self.readmodels.datastore.transaction(commit=True) as curs:
            curs.execute(
                "INSERT INTO rate_windows VALUES (%s, %s, 1) ON CONFLICT (user_id, window_start)"
                " DO UPDATE SET count = rate_windows.count + 1 RETURNING count",
                (user_id, window),
            )
            row = curs.fetchone()
            count = int(row["count"]) if row else 0
            if random.random() < 0.01:  # now and then, forget old windows
                curs.execute("DELETE FROM rate_windows WHERE window_start < %s", (window - 1,))
        if count > self.per_minute:
            return Limited(
                f"at most {self.per_minute} messages a minute; try again shortly",
                retry_after=int(WINDOW_S - now % WINDOW_S) + 1,
            )
        if self.tokens_per_day and self.readmodels.tokens_today(user_id) >= self.tokens_per_day:
            return Limited(
                f"the daily quota of {self.tokens_per_day} tokens is used up; it resets at midnight UTC",
                retry_after=int(86400 - now % 86400) + 1,
            )
        return None
