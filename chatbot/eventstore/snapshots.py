"""Sealed snapshots: each snapshot row carries a MAC under the chain key (chain.py).

Sealed snapshots. A snapshot row carries `mac` = HMAC(chain key, "snapshot" | id | version |
topic | state); a row whose MAC fails is ignored (the aggregate is replayed from its events
instead), so a snapshot copied from another conversation or version is never loaded. Only
the newest snapshot of an aggregate is kept.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresAggregateRecorder, PostgresDatastore
from psycopg.sql import SQL, Identifier

from chatbot.eventstore.chain import snapshot_mac
from chatbot.eventstore.keys import key_owner

log = logging.getLogger("eventstore")


class SealedSnapshotRecorder(PostgresAggregateRecorder):
    """Snapshots with a MAC; rows that fail it are ignored; only the newest is kept."""

    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_snapshots",
                 mac_key: bytes = b"") -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        if not mac_key:
            raise ValueError("a sealed snapshot recorder needs the chain key")
        self.mac_key = mac_key
        self.table = Identifier(datastore.schema), Identifier(events_table_name)
        self.sql_create_statements.append(
            SQL("ALTER TABLE {}.{} ADD COLUMN IF NOT EXISTS mac bytea").format(*self.table)
        )
        id_type = SQL(datastore.originator_id_type)  # type: ignore[arg-type]
        self.insert_sealed = SQL(
            "INSERT INTO {}.{} (originator_id, originator_version, topic, state, mac)"
            " SELECT * FROM unnest(%s::{id}[], %s::bigint[], %s::text[], %s::bytea[], %s::bytea[])"
            " ON CONFLICT (originator_id, originator_version) DO NOTHING"
        ).format(*self.table, id=id_type)
        self.delete_older = SQL(
            "DELETE FROM {}.{} s USING unnest(%s::{id}[], %s::bigint[]) AS n(originator_id, originator_version)"
            " WHERE s.originator_id = n.originator_id AND s.originator_version < n.originator_version"
        ).format(*self.table, id=id_type)

    def _insert_stored_events(self, curs: Any, stored_events: Sequence[StoredEvent], **_: Any) -> None:
        with curs.connection.transaction():
            users = sorted({o for e in stored_events if (o := key_owner(e.state)) is not None})
            if users:  # a snapshot taken as its user is erased is dropped, not stored
                curs.execute("SELECT user_id FROM user_keys WHERE user_id = ANY(%s) AND wrapped_key IS NOT NULL"
                             " ORDER BY user_id FOR SHARE", (users,))
                live = {r["user_id"] for r in curs.fetchall()}
                stored_events = [e for e in stored_events if key_owner(e.state) in live or key_owner(e.state) is None]
                if not stored_events:
                    return
            newest: dict[Any, int] = {}
            for e in stored_events:
                newest[e.originator_id] = max(newest.get(e.originator_id, 0), e.originator_version)
            curs.execute(self.insert_sealed, (
                [e.originator_id for e in stored_events], [e.originator_version for e in stored_events],
                [e.topic for e in stored_events], [e.state for e in stored_events],
                [snapshot_mac(self.mac_key, e) for e in stored_events],
            ))
            curs.execute(self.delete_older, (list(newest), list(newest.values())))

    def select_events(self, originator_id: UUID | str, *, gt: int | None = None, lte: int | None = None,
                      desc: bool = False, limit: int | None = None) -> Sequence[StoredEvent]:
        statement = SQL("SELECT * FROM {}.{} WHERE originator_id = %s").format(*self.table)
        params: list[Any] = [originator_id]
        if gt is not None:
            statement += SQL(" AND originator_version > %s")
            params.append(gt)
        if lte is not None:
            statement += SQL(" AND originator_version <= %s")
            params.append(lte)
        statement += SQL(" ORDER BY originator_version DESC" if desc else " ORDER BY originator_version ASC")
        if limit is not None:
            statement += SQL(" LIMIT %s")
            params.append(limit)
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(statement, params, prepare=True)
            rows = curs.fetchall()
        sealed = []
        for row in rows:
            e = StoredEvent(originator_id=row["originator_id"], originator_version=row["originator_version"],
                            topic=row["topic"], state=bytes(row["state"]))
            if row["mac"] is None or not hmac.compare_digest(bytes(row["mac"]), snapshot_mac(self.mac_key, e)):
                log.warning("snapshot %s v%s fails its MAC: ignored", e.originator_id, e.originator_version)
                continue
            sealed.append(e)
        return sealed
