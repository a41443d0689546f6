"""Where the projection stands, per partition of the event stream.

With one partition the projection records one position (tracking name `chat`), as the
`eventsourcing` idiom has it: the notification id of the last event applied. With
`CHATBOT_PARTITIONS=N` (N > 1) it records one position per partition (`chat.p3of8`), so
several projectors can each apply a subset of the partitions in their own order: a
conversation's events are all on one partition, so their order holds, while different
conversations no longer wait for each other. The tracking table keeps one row per name
and refuses a position that does not grow (`IntegrityError`), so two projectors that
happen to read the same partition cannot both apply an event.

Changing N maps aggregates to other partitions. A new layout's partitions start from the
newest position of the other layouts (the `chat` row, or the rows of the previous N),
which is exact when the switch is made with the projection caught up: stop the relay,
wait until `chatbot projections status` shows no lag, then restart everything with the
new N.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from eventsourcing.persistence import Tracking
from psycopg.sql import SQL, Identifier

from chatbot.bus.messaging import partition_of
from projections.readmodels import APPLICATION

_NAME = re.compile(rf"{re.escape(APPLICATION)}\.p(\d+)of(\d+)")


def tracking_name(partition: int, partitions: int) -> str:
    assert 0 <= partition < partitions, f"partition {partition} is not one of 0-{partitions - 1}"
    return APPLICATION if partitions == 1 else f"{APPLICATION}.p{partition}of{partitions}"


def parse_tracking_name(name: str) -> tuple[int, int] | None:
    """`chat.p3of8` -> (3, 8); `chat` -> (0, 1); any other name -> None."""
    if name == APPLICATION:
        return 0, 1
    match = _NAME.fullmatch(name)
    return (int(match[1]), int(match[2])) if match else None


@dataclass
class PartitionPositions:
    """The last notification id applied on each partition of one layout."""

    partitions: int
    applied: dict[int, int] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: Mapping[str, int], partitions: int) -> PartitionPositions:
        layouts = {name: parse_tracking_name(name) for name in rows}
        floor = max(
            (rows[name] for name, parsed in layouts.items() if parsed and parsed[1] != partitions), default=0
        )
        return cls(partitions, {
            p: max(floor, rows.get(tracking_name(p, partitions), 0)) for p in range(partitions)
        })

    def partition(self, originator_id: UUID | str) -> int:
        return partition_of(originator_id, self.partitions)

    def is_applied(self, originator_id: UUID | str, notification_id: int) -> bool:
        return notification_id <= self.applied[self.partition(originator_id)]

    def tracking(self, originator_id: UUID | str, notification_id: int) -> Tracking:
        return Tracking(tracking_name(self.partition(originator_id), self.partitions), notification_id)

    def record(self, originator_id: UUID | str, notification_id: int) -> None:
        partition = self.partition(originator_id)
        self.applied[partition] = max(self.applied[partition], notification_id)

    @property
    def head(self) -> int:
        """The newest event applied on any partition."""
        return max(self.applied.values(), default=0)


def tracking_rows(recorder: Any, curs: Any = None) -> dict[str, int]:
    """Every projection position in the recorder's tracking table, by name (`curs`: read
    inside that transaction)."""
    query = SQL("SELECT application_name, max(notification_id) AS position FROM {}.{}"
                " WHERE application_name = %s OR application_name LIKE %s GROUP BY application_name").format(
        Identifier(recorder.datastore.schema), Identifier(recorder.tracking_table_name)
    )
    params = (APPLICATION, f"{APPLICATION}.p%")
    if curs is not None:
        curs.execute(query, params)
        rows = curs.fetchall()
    else:
        with recorder.datastore.get_connection() as conn, conn.cursor() as c:
            c.execute(query, params)
            rows = c.fetchall()
    return {r["application_name"]: int(r["position"]) for r in rows if r["position"] is not None}


def read_positions(recorder: Any, partitions: int, curs: Any = None) -> PartitionPositions:
    return PartitionPositions.from_rows(tracking_rows(recorder, curs), partitions)
