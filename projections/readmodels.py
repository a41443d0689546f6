"""Read models in PostgreSQL: personas, conversations per user, messages per conversation.

`ReadModelRecorder` is a tracking recorder (the `eventsourcing` idiom): every write method
takes the `Tracking` of the event that caused it and records it in the same transaction as
the rows. Replaying an event that was already applied fails to record its tracking
(`IntegrityError`), which rolls the whole transaction back: replays change nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.persistence import Tracking
from eventsourcing.postgres import PostgresFactory, PostgresTrackingRecorder
from eventsourcing.utils import Environment
from psycopg.rows import DictRow
from psycopg.sql import SQL
from psycopg.types.json import Jsonb

from chatbot.postgres import flush_pipeline

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS rm_personas (
        id uuid PRIMARY KEY, slug text NOT NULL, name text NOT NULL,
        description text NOT NULL, greeting text NOT NULL, model text NOT NULL,
        version int NOT NULL, updated_at timestamptz NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS rm_conversations (
        id uuid PRIMARY KEY, owner_id uuid NOT NULL, persona_id uuid NOT NULL,
        title text NOT NULL, message_count int NOT NULL DEFAULT 0,
        created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS rm_conversations_owner ON rm_conversations (owner_id, updated_at DESC)",
    """CREATE TABLE IF NOT EXISTS rm_messages (
        id uuid PRIMARY KEY, conversation_id uuid NOT NULL, seq int NOT NULL,
        role text NOT NULL, text text NOT NULL, status text NOT NULL,
        reply_to uuid, finish_reason text, model text,
        created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS rm_messages_order ON rm_messages (conversation_id, seq)",
    # added with persona management: columns a table created earlier lacks
    "ALTER TABLE rm_personas ADD COLUMN IF NOT EXISTS owner_id uuid",
    "ALTER TABLE rm_personas ADD COLUMN IF NOT EXISTS visibility text NOT NULL DEFAULT 'public'",
    # slugs are unique per creator (domain/ids.py), not across users
    "ALTER TABLE rm_personas DROP CONSTRAINT IF EXISTS rm_personas_slug_key",
    "ALTER TABLE rm_personas ADD COLUMN IF NOT EXISTS retired boolean NOT NULL DEFAULT false",
    "ALTER TABLE rm_personas ADD COLUMN IF NOT EXISTS avatar text NOT NULL DEFAULT ''",
    "ALTER TABLE rm_messages ADD COLUMN IF NOT EXISTS feedback text",
    # message trees (regenerate, edit) and conversation management
    "ALTER TABLE rm_messages ADD COLUMN IF NOT EXISTS parent_id uuid",
    "ALTER TABLE rm_conversations ADD COLUMN IF NOT EXISTS current_leaf uuid",
    "ALTER TABLE rm_conversations ADD COLUMN IF NOT EXISTS archived boolean NOT NULL DEFAULT false",
    "ALTER TABLE rm_conversations ADD COLUMN IF NOT EXISTS expires_at timestamptz",
    "CREATE INDEX IF NOT EXISTS rm_conversations_expiry ON rm_conversations (expires_at) WHERE expires_at IS NOT NULL",
    # read-only snapshots shared by link
    """CREATE TABLE IF NOT EXISTS rm_shares (
        id uuid PRIMARY KEY, conversation_id uuid NOT NULL, owner_id uuid NOT NULL,
        title text NOT NULL, persona_name text NOT NULL, messages jsonb NOT NULL,
        created_at timestamptz NOT NULL, revoked boolean NOT NULL DEFAULT false)""",
    "CREATE INDEX IF NOT EXISTS rm_shares_conversation ON rm_shares (conversation_id)",
    # tokens each user's replies used per day: the daily quota reads it
    """CREATE TABLE IF NOT EXISTS rm_usage (
        user_id uuid NOT NULL, day date NOT NULL, tokens bigint NOT NULL DEFAULT 0,
        replies int NOT NULL DEFAULT 0, PRIMARY KEY (user_id, day))""",
    # whose each conversation is, kept when the conversation is deleted or expires, so a
    # reply that finishes after that still counts against its owner's quota (only ids;
    # erasing the user removes the rows)
    """CREATE TABLE IF NOT EXISTS rm_owners (
        conversation_id uuid PRIMARY KEY, user_id uuid NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS rm_owners_user ON rm_owners (user_id)",
    # conversations projected before rm_owners existed
    "INSERT INTO rm_owners SELECT id, owner_id FROM rm_conversations ON CONFLICT DO NOTHING",
]
PERSONA_COLUMNS = ("name", "description", "greeting", "model", "avatar", "visibility", "retired")

APPLICATION = "chat"  # the notification log the projections follow


LIVE_PREFIX = "rm_"
TABLES = ("personas", "conversations", "messages", "usage", "shares", "owners")


class ReadModelRecorder(PostgresTrackingRecorder):
    """`prefix` names the tables: `rm_` are the live ones; a rebuild fills `rb_` ones."""

    def __init__(self, *args: Any, prefix: str = LIVE_PREFIX, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prefix = prefix
        self.sql_create_statements.extend(SQL(self.sql(s)) for s in SCHEMA)  # type: ignore[arg-type]
        self._batch: Any = None  # the cursor of an open batch transaction, if any
        self._batch_tracking: dict[str, Tracking] = {}  # the newest position per tracking name
        self._batch_thread = 0  # the thread whose writes join the batch

    def sql(self, text: str) -> str:
        """The statement for this recorder's tables (every `rm_` in the SQL is a name)."""
        return text if self.prefix == LIVE_PREFIX else text.replace(LIVE_PREFIX, self.prefix)

    def _exec(self, curs: Any, text: str, params: Any = None) -> None:
        curs.execute(self.sql(text), params)
        flush_pipeline(curs.connection)  # in a batch's pipeline a big row is otherwise left half-sent

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """A transaction per write, or the open batch's (in the thread that opened it)."""
        if self._batch is not None and self._batch_thread == threading.get_ident():
            yield self._batch
            return
        with self.datastore.transaction(commit=True) as curs:
            yield curs

    @contextmanager
    def batch(self, curs: Any = None) -> Iterator[Any]:
        """Apply many events in one transaction (a rebuild, or a projector's batch):
        statements stream to the server in pipeline mode, and the tracking position is
        written once, at the end, instead of one commit and several round trips per event.
        With `curs`, join that transaction instead of opening one. Positions must only grow within a batch; with
        several tracking names (partitions) each name's newest is written."""
        context = nullcontext(curs) if curs is not None else self.datastore.transaction(commit=True)
        with context as curs:
            self._batch, self._batch_tracking, self._batch_thread = curs, {}, threading.get_ident()
            try:
                with curs.connection.pipeline():
                    yield curs
                for tracking in self._batch_tracking.values():
                    super()._insert_tracking(curs, tracking)
            finally:
                self._batch, self._batch_tracking = None, {}

    def _insert_tracking(self, curs: Any, tracking: Tracking) -> None:
        if self._batch is not None and self._batch_thread == threading.get_ident():
            self._batch_tracking[tracking.application_name] = tracking  # written when the batch ends
            return
        super()._insert_tracking(curs, tracking)

    # -- writes (each with its tracking, in one transaction) -------------------------------

    def skip(self, tracking: Tracking) -> None:
        """Record the position of an event no read model needs."""
        with self._tx() as curs:
            self._insert_tracking(curs, tracking)

    def upsert_persona(self, tracking: Tracking, row: dict[str, Any]) -> None:
        with self._tx() as curs:
            self._insert_tracking(curs, tracking)
            self._exec(
                curs, "INSERT INTO rm_personas (id, slug, name, description, greeting, model, version, updated_at,"
                " owner_id, visibility, avatar)"
                " VALUES (%(id)s, %(slug)s, %(name)s, %(description)s, %(greeting)s, %(model)s,"
                " %(version)s, %(updated_at)s, %(owner_id)s, %(visibility)s, %(avatar)s)",
                row,
            )

    def update_persona(self, tracking: Tracking, persona_id: UUID, version: int, at: datetime,
                       changes: dict[str, Any]) -> None:
        columns = {k: v for k, v in changes.items() if k in PERSONA_COLUMNS}
        sets = "".join(f", {k} = %({k})s" for k in columns)  # names from PERSONA_COLUMNS only
        with self._tx() as curs:
            self._insert_tracking(curs, tracking)
            self._exec(
                curs, f"UPDATE rm_personas SET version = %(version)s, updated_at = %(at)s{sets} WHERE id = %(id)s",
                {**columns, "version": version, "at": at, "id": persona_id},
            )

    def insert_conversation(self, tracking: Tracking, row: dict[str, Any]) -> None:
        with self._tx() as curs:
            self._insert_tracking(curs, tracking)
            self._exec(
                curs, "INSERT INTO rm_conversations (id, owner_id, persona_id, title, created_at, updated_at)"
                " VALUES (%(id)s, %(owner_id)s, %(persona_id)s, %(title)s, %(at)s, %(at)s)",
                row,
            )
            self._exec(curs, "INSERT INTO rm_owners (conversation_id, user_id) VALUES (%(id)s, %(owner_id)s)", row)

    def add_message(self, tracking: Tracking, row: dict[str, Any]) -> None:
        """A new message of the tree; it becomes the conversation's current leaf."""
        with self._tx() as curs:
            self._insert_tracking(curs, tracking)
            self._insert_message(curs, row)
            self._exec(
                curs, "UPDATE rm_conversations SET message_count = message_count + 1, updated_at = %(at)s,"
                " current_leaf = %(id)s WHERE id = %(conversation_id)s",
                row,
            )

    def _insert_message(self, curs: Any, row: dict[str, Any]) -> None:
        self._exec(
            curs, "INSERT INTO rm_messages (id, conversation_id, seq, role, text, status, reply_to, parent_id,"
            " created_at, updated_at)"
            " SELECT %(id)s, %(conversation_id)s, coalesce(max(seq), 0) + 1, %(role)s, %(text)s, %(status)s,"
            " %(reply_to)s, %(parent_id)s, %(at)s, %(at)s"
            " FROM rm_messages WHERE conversation_id = %(conversation_id)s",
            row,
        )

    def update_conversation(self, tracking: Tracking, conversation_id: UUID, changes: dict[str, Any]) -> None:
        """Set the title, archived flag, current leaf or expiry (names from a fixed set only)."""
        columns = {k: v for k, v in changes.items() if k in ("title", "archived", "current_leaf", "expires_at")}
        sets = ", ".join(f"{k} = %({k})s" for k in columns)
        with self._tx() as curs:
            self._insert_tracking(curs, tracking)
            self._exec(curs, f"UPDATE rm_conversations SET {sets} WHERE id = %(id)s", {**columns, "id": conversation_id})

    def delete_conversation(self, tracking: Tracking, conversation_id: UUID) -> None:
        """A deleted conversation leaves the read models (its usage still counts)."""
        with self._tx() as curs:
            self._insert_tracking(curs, tracking)
            self._exec(curs, "DELETE FROM rm_messages WHERE conversation_id = %(id)s", {"id": conversation_id})
            self._exec(curs, "DELETE FROM rm_shares WHERE conversation_id = %(id)s", {"id": conversation_id})
            self._exec(curs, "DELETE FROM rm_conversations WHERE id = %(id)s", {"id": conversation_id})

    def import_tree(self, tracking: Tracking, conversation_id: UUID, nodes: list[dict[str, Any]],
                    current: UUID, title: str | None, at: datetime) -> None:
        """Messages brought in all at once, parents first: a whole conversation from an
        export (with its title), or the earlier turns of an OpenAI-style request (a chain,
        title unchanged)."""
        with self._tx() as curs:
            self._insert_tracking(curs, tracking)
            for node in nodes:
                self._insert_message(curs, {
                    "id": node["id"], "conversation_id": conversation_id, "role": node["role"],
                    "text": node["text"], "status": "complete", "reply_to": None,
                    "parent_id": node["parent_id"], "at": at,
                })
            self._exec(
                curs, "UPDATE rm_conversations SET message_count = message_count + %(n)s, updated_at = %(at)s,"
                " current_leaf = %(leaf)s, title = coalesce(%(title)s::text, title) WHERE id = %(cid)s",
                {"n": len(nodes), "at": at, "cid": conversation_id, "leaf": current, "title": title},
            )

    def add_share(self, tracking: Tracking, row: dict[str, Any]) -> None:
        with self._tx() as curs:
            self._insert_tracking(curs, tracking)
            self._exec(
                curs, "INSERT INTO rm_shares (id, conversation_id, owner_id, title, persona_name, messages, created_at)"
                " SELECT %(id)s, c.id, c.owner_id, %(title)s, coalesce(p.name, ''), %(messages)s, %(at)s"
                " FROM rm_conversations c LEFT JOIN rm_personas p ON p.id = c.persona_id"
                " WHERE c.id = %(conversation_id)s",
                {**row, "messages": Jsonb(row["messages"])},
            )

    def revoke_share(self, tracking: Tracking, share_id: UUID) -> None:
        with self._tx() as curs:
            self._insert_tracking(curs, tracking)
            self._exec(curs, "UPDATE rm_shares SET revoked = true WHERE id = %(id)s", {"id": share_id})

    def rate_reply(self, tracking: Tracking, reply_id: UUID, rating: str) -> None:
        with self._tx() as curs:
            self._insert_tracking(curs, tracking)
            self._exec(curs, "UPDATE rm_messages SET feedback = %s WHERE id = %s", (rating, reply_id))

    def finish_reply(self, tracking: Tracking, row: dict[str, Any]) -> None:
        with self._tx() as curs:
            self._insert_tracking(curs, tracking)
            self._exec(
                curs, "INSERT INTO rm_usage (user_id, day, tokens, replies)"
                " SELECT user_id, (%(at)s::timestamptz AT TIME ZONE 'UTC')::date, %(tokens)s, 1"
                " FROM rm_owners WHERE conversation_id = %(conversation_id)s"
                " ON CONFLICT (user_id, day) DO UPDATE SET tokens = rm_usage.tokens + EXCLUDED.tokens,"
                " replies = rm_usage.replies + 1",
                {"at": row["at"], "tokens": row.get("tokens", 0), "conversation_id": row["conversation_id"]},
            )
            self._exec(
                curs, "UPDATE rm_messages SET text = %(text)s, status = %(status)s,"
                " finish_reason = %(finish_reason)s, model = %(model)s, updated_at = %(at)s"
                " WHERE id = %(id)s",
                row,
            )
            self._exec(
                curs, "UPDATE rm_conversations SET updated_at = %(at)s WHERE id = %(conversation_id)s", row
            )

    def erase_user(self, tracking: Tracking, user_id: UUID) -> None:
        """An erased user leaves every read model: their conversations, and the rows of
        every table with a `conversation_id` (of theirs) or a `user_id` (theirs) column,
        found in the catalogue so that tables added later are covered too. On the live
        tables, also their rate-limit windows (not a read model, but about them)."""
        with self._tx() as curs:
            self._insert_tracking(curs, tracking)
            curs.execute(
                "SELECT table_name, column_name FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND column_name IN ('conversation_id', 'user_id')"
                " AND table_name LIKE %s ORDER BY table_name",
                (self.sql("rm_").replace("_", "\\_") + "%",),
            )
            for row in curs.fetchall():
                table, column = row["table_name"], row["column_name"]  # names from the catalogue
                if column == "conversation_id":
                    curs.execute(
                        f'DELETE FROM "{table}" WHERE conversation_id IN'
                        f" (SELECT id FROM {self.sql('rm_conversations')} WHERE owner_id = %s)", (user_id,),
                    )
                else:
                    curs.execute(f'DELETE FROM "{table}" WHERE user_id = %s', (user_id,))
            self._exec(curs, "DELETE FROM rm_conversations WHERE owner_id = %s", (user_id,))
            if self.prefix == LIVE_PREFIX:
                curs.execute("SELECT to_regclass('rate_windows') IS NOT NULL AS present")
                if curs.fetchone()["present"]:
                    curs.execute("DELETE FROM rate_windows WHERE user_id = %s", (user_id,))

    # -- reads ------------------------------------------------------------------------------

    def _query(self, sql: str, params: dict[str, Any]) -> list[DictRow]:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self.sql(sql), params)
            return curs.fetchall()

    def personas(self, user_id: UUID | None = None) -> list[DictRow]:
        """The personas a user may chat with: public ones and their own."""
        return self._query(
            "SELECT * FROM rm_personas WHERE NOT retired"
            " AND (visibility = 'public' OR owner_id = %(user)s) ORDER BY owner_id NULLS FIRST, name",
            {"user": user_id},
        )

    def conversations(
        self, owner_id: UUID, limit: int = 50, before: datetime | None = None, query: str = "",
        archived: bool = False,
    ) -> list[DictRow]:
        """A page of the user's conversations, newest first: those updated before `before`
        whose title or any message contains `query` (case-insensitive)."""
        pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%" if query else None
        return self._query(
            "SELECT id, persona_id, title, message_count, archived, expires_at, created_at, updated_at"
            " FROM rm_conversations c WHERE owner_id = %(owner)s AND archived = %(archived)s"
            " AND (%(before)s::timestamptz IS NULL OR updated_at < %(before)s)"
            " AND (%(pattern)s::text IS NULL OR title ILIKE %(pattern)s OR EXISTS ("
            "   SELECT 1 FROM rm_messages m WHERE m.conversation_id = c.id AND m.text ILIKE %(pattern)s))"
            " ORDER BY updated_at DESC LIMIT %(limit)s",
            {"owner": owner_id, "limit": limit, "before": before, "pattern": pattern, "archived": archived},
        )

    def conversation(self, conversation_id: UUID) -> DictRow | None:
        rows = self._query("SELECT * FROM rm_conversations WHERE id = %(id)s", {"id": conversation_id})
        return rows[0] if rows else None

    def messages(self, conversation_id: UUID) -> list[DictRow]:
        """Every message of the conversation's tree, in the order written."""
        return self._query(
            "SELECT id, role, text, status, reply_to, parent_id, finish_reason, model, feedback, created_at"
            " FROM rm_messages WHERE conversation_id = %(id)s ORDER BY seq",
            {"id": conversation_id},
        )

    def branch(self, conversation_id: UUID) -> list[dict[str, Any]]:
        """The active branch, root to the current leaf; each message lists its siblings
        (the children of its parent, itself included, in the order written)."""
        conversation = self.conversation(conversation_id)
        if conversation is None:
            return []
        rows = self.messages(conversation_id)
        by_id = {row["id"]: row for row in rows}
        children: dict[UUID | None, list[UUID]] = {}
        for row in rows:
            children.setdefault(row["parent_id"], []).append(row["id"])
        path = []
        node = conversation["current_leaf"]
        while node is not None and node in by_id:
            path.append({**by_id[node], "siblings": children[by_id[node]["parent_id"]]})
            node = by_id[node]["parent_id"]
        return path[::-1]

    def due_expiries(self, limit: int = 500) -> list[UUID]:
        """Temporary conversations past their time, oldest first (the retention job)."""
        rows = self._query(
            "SELECT id FROM rm_conversations WHERE expires_at <= now() ORDER BY expires_at LIMIT %(limit)s",
            {"limit": limit},
        )
        return [row["id"] for row in rows]

    def share(self, share_id: UUID) -> DictRow | None:
        """A shared snapshot anyone with the link may read (None once revoked)."""
        rows = self._query(
            "SELECT id, title, persona_name, messages, created_at FROM rm_shares WHERE id = %(id)s AND NOT revoked",
            {"id": share_id},
        )
        return rows[0] if rows else None

    def shares(self, conversation_id: UUID) -> list[DictRow]:
        return self._query(
            "SELECT id, created_at, revoked FROM rm_shares WHERE conversation_id = %(id)s ORDER BY created_at",
            {"id": conversation_id},
        )

    def tokens_today(self, user_id: UUID) -> int:
        rows = self._query(
            "SELECT tokens FROM rm_usage WHERE user_id = %(user)s AND day = (now() AT TIME ZONE 'UTC')::date",
            {"user": user_id},
        )
        return int(rows[0]["tokens"]) if rows else 0

    def message(self, message_id: UUID) -> DictRow | None:
        rows = self._query("SELECT * FROM rm_messages WHERE id = %(id)s", {"id": message_id})
        return rows[0] if rows else None

    def messages_by_id(self, message_ids: list[UUID]) -> list[DictRow]:
        """Where each of these messages stands (those not projected yet are left out)."""
        return self._query(
            "SELECT id, status, text, finish_reason FROM rm_messages WHERE id = ANY(%(ids)s)", {"ids": message_ids}
        )

    def position(self) -> int:
        return self.max_tracking_id(APPLICATION) or 0


def read_model_recorder(pg_env: dict[str, str], prefix: str = LIVE_PREFIX) -> ReadModelRecorder:
    """Build the recorder on its own connection pool. The live tables track their position
    in `readmodels_tracking`; a rebuild's tables in `rebuild_tracking`."""
    name = "readmodels" if prefix == LIVE_PREFIX else "rebuild"
    factory = PostgresFactory(Environment(name=name, env=pg_env))
    recorder = ReadModelRecorder(datastore=factory.datastore, tracking_table_name=f"{name}_tracking", prefix=prefix)
    if factory.env_create_table():
        recorder.create_table()
    return recorder
