"""Projection status and rebuild: replay the event store into fresh tables, verify them
against the live ones, and switch readers over atomically while the API keeps serving.

A rebuild
1. creates empty `rb_*` tables (and its own tracking table),
2. replays every event from the event store's notification log into them, a thousand
   events per transaction, the statements streamed in pipeline mode and the tracking
   position written once per batch, printing a progress bar and events/s,
3. then, in one transaction: locks the live `rm_*` tables (the projector's next write and
   the API's reads wait a few milliseconds), replays the events the live projector applied
   since step 2 ended, compares every row of both sets of tables, and swaps them by
   renaming. Readers never see a half-built table: before the commit they see the old
   tables, after it the new ones. The projector's blocked write then lands in the new ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eventsourcing.persistence import Notification, Tracking
from psycopg.errors import DeadlockDetected
from tqdm import tqdm

from chatbot.eventstore.application import event_log
from chatbot.eventstore.keys import DataErased, Unreadable
from chatbot.eventstore.log import EventLog
from chatbot.runtime.config import Settings
from projections.positions import read_positions
from projections.projector import ChatProjection
from projections.readmodels import (
    APPLICATION,
    LIVE_PREFIX,
    TABLES,
    ReadModelRecorder,
    read_model_recorder,
)

REBUILD_PREFIX = "rb_"
OLD_PREFIX = "old_"
BATCH = 1000
PROJECTIONS = ("chat",)  # one projection maintains all the read models


@dataclass
class RebuildReport:
    events: int = 0
    seconds: float = 0.0
    position: int = 0
    differences: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[str]] = field(default_factory=dict)  # a few differing rows per table
    switched: bool = False

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def status(settings: Settings) -> dict[str, Any]:
    events = event_log(settings)
    live = read_model_recorder(settings.eventsourcing_env())
    try:
        head = events.head()
        with live.datastore.get_connection() as conn:
            row = conn.execute("SELECT notification_id FROM relay_position WHERE name = 'chat'").fetchone()
        relay = int(row["notification_id"]) if row else 0
        positions = read_positions(live, settings.partitions)
        position = positions.head
        report: dict[str, Any] = {
            "event_store_head": head,
            "relay": {"position": relay, "lag": head - relay},
            "projections": {"chat": {"position": position, "lag": head - position,
                                     "tables": [LIVE_PREFIX + t for t in TABLES]}},
        }
        if settings.partitions > 1:  # where each partition stands (a quiet one stays behind)
            report["projections"]["chat"]["partitions"] = {str(p): n for p, n in positions.applied.items()}
        return report
    finally:
        live.datastore.close()
        events.close()


def replay(events: EventLog, projection: ChatProjection, start: int, stop: int | None,
           curs: Any = None, bar: tqdm | None = None,
           include: Callable[[Notification], bool] | None = None) -> tuple[int, int]:
    """Apply notifications after `start` (up to `stop`) in batches; returns (count, last).
    `include` leaves out the notifications it refuses (not yet applied live)."""
    count, position = 0, start
    while True:
        limit = BATCH if stop is None else min(BATCH, stop - position)
        if limit <= 0:
            break
        notifications = events.read(position, limit)
        if not notifications:
            break
        with projection.view.batch(curs):
            for n in notifications:
                if include is not None and not include(n):
                    continue
                try:
                    event = events.decode(n)
                except DataErased:  # an erased user's event: skipped, as the live projector does
                    event = Unreadable(n.originator_id, n.originator_version)
                projection.process_event(event, Tracking(APPLICATION, n.id))
                count += 1
        position = notifications[-1].id
        if bar is not None:
            bar.update(len(notifications))
    return count, position


def columns(curs: Any, table: str) -> list[str]:
    curs.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = %s ORDER BY ordinal_position",
        (table,),
    )
    return [r["column_name"] for r in curs.fetchall()]


def column_types(curs: Any, table: str) -> list[tuple[str, str]]:
    curs.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s"
        " ORDER BY column_name", (table,),
    )
    return [(r["column_name"], r["data_type"]) for r in curs.fetchall()]


def differences(curs: Any, samples: dict[str, list[str]] | None = None) -> dict[str, int]:
    """Rows in one set of tables and not the other, per table (0 everywhere: identical).
    With `samples`, up to 3 rows of each side of each differing table go in it. Tables
    whose columns differ (made by an older version) are not compared: -1."""
    found = {}
    for t in TABLES:
        if column_types(curs, LIVE_PREFIX + t) != column_types(curs, REBUILD_PREFIX + t):
            found[LIVE_PREFIX + t] = -1
            continue
        cols = ", ".join(columns(curs, LIVE_PREFIX + t))
        live_only = f"SELECT {cols} FROM {LIVE_PREFIX}{t} EXCEPT ALL SELECT {cols} FROM {REBUILD_PREFIX}{t}"
        rebuilt_only = f"SELECT {cols} FROM {REBUILD_PREFIX}{t} EXCEPT ALL SELECT {cols} FROM {LIVE_PREFIX}{t}"
        curs.execute(f"SELECT (SELECT count(*) FROM ({live_only}) a) + (SELECT count(*) FROM ({rebuilt_only}) b) AS n")
        found[LIVE_PREFIX + t] = int(curs.fetchone()["n"])
        if samples is not None and found[LIVE_PREFIX + t]:
            for side, query in (("live", live_only), ("rebuilt", rebuilt_only)):
                curs.execute(f"{query} LIMIT 3")
                samples.setdefault(LIVE_PREFIX + t, []).extend(f"{side}: {dict(r)}" for r in curs.fetchall())
    return found


def rename_tables(curs: Any, old: str, new: str) -> None:
    """Rename each read-model table and its indexes from prefix `old` to `new`."""
    for t in TABLES:
        curs.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s", (old + t,))
        for (index,) in [tuple(r.values()) for r in curs.fetchall()]:
            curs.execute(f'ALTER INDEX "{index}" RENAME TO "{new + index[len(old):]}"')
        curs.execute(f"ALTER TABLE {old}{t} RENAME TO {new}{t}")


def rebuild(settings: Settings, *, dry_run: bool = False, progress: bool = True) -> RebuildReport:
    events = event_log(settings)
    live = read_model_recorder(settings.eventsourcing_env())
    with live.datastore.transaction(commit=True) as curs:
        curs.execute(", ".join(f"{REBUILD_PREFIX}{t}" for t in TABLES).join(["DROP TABLE IF EXISTS ", ""]))
        curs.execute("DROP TABLE IF EXISTS rebuild_tracking")
    fresh: ReadModelRecorder = read_model_recorder(settings.eventsourcing_env(create_tables=True), prefix=REBUILD_PREFIX,
                                                   keys=events.keys)
    projection = ChatProjection(fresh)
    report = RebuildReport()
    try:
        head = events.head()
        started = time.perf_counter()
        with fresh.datastore.transaction(commit=True) as curs:
            curs.execute("SELECT 1")  # open the pool before timing
        with tqdm(total=head, unit="ev", desc="rebuild", disable=not progress) as bar:
            report.events, position = replay(events, projection, 0, None, bar=bar)
        report.seconds = time.perf_counter() - started
        for attempt in range(3):
            try:
                with live.datastore.transaction(commit=not dry_run) as curs:
                    curs.execute("SET LOCAL lock_timeout = '5s'")
                    curs.execute(f"LOCK TABLE {', '.join(LIVE_PREFIX + t for t in TABLES)} IN ACCESS EXCLUSIVE MODE")
                    # where the live projection stands, per partition when there are several
                    live_positions = read_positions(live, settings.partitions, curs)
                    target = live_positions.head
                    caught_up, position = replay(
                        events, projection, position, target, curs=curs,
                        include=lambda n: live_positions.is_applied(n.originator_id, n.id),
                    )
                    report.events += caught_up
                    report.position = position
                    report.differences = differences(curs, report.samples)
                    if not dry_run:
                        rename_tables(curs, LIVE_PREFIX, OLD_PREFIX)
                        rename_tables(curs, REBUILD_PREFIX, LIVE_PREFIX)
                        curs.execute(", ".join(f"{OLD_PREFIX}{t}" for t in TABLES).join(["DROP TABLE ", ""]))
                        report.switched = True
                break
            except DeadlockDetected:
                if attempt == 2:
                    raise
                time.sleep(0.2)  # the projector held a table we wanted: try again
        return report
    finally:
        if dry_run or not report.switched:
            with live.datastore.transaction(commit=True) as curs:
                curs.execute(", ".join(f"{REBUILD_PREFIX}{t}" for t in TABLES).join(["DROP TABLE IF EXISTS ", ""]))
        fresh.datastore.close()
        live.datastore.close()
        events.close()
