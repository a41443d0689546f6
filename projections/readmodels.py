"""Read models in PostgreSQL: personas, conversations per user, messages per conversation.

`ReadModelRecorder` is a tracking recorder (the `eventsourcing` idiom): every write method
takes the `Tracking` of the event that caused it and records it in the same transaction as
the rows. Replaying an event that was already applied fails to record its tracking
(`IntegrityError`), which rolls the whole transaction back: replays change nothing.

This module holds the tables and the writes; the reads are `ReadModelQueries`
(projections/queries.py), which the recorder inherits.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.persistence import Tracking
from eventsourcing.postgres import PostgresFactory, PostgresTrackingRecorder
from eventsourcing.utils import Environment
from psycopg.rows import DictRow, dict_row
from psycopg.sql import SQL

from chatbot.eventstore.keys import KeyStore
from chatbot.runtime.postgres import flush_pipeline
from projections.queries import PERSONA_SEALED, ReadModelQueries
from projections.sealing import Sealer

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS rm_personas (
        id uuid PRIMARY KEY, slug text NOT NULL, name bytea NOT NULL,
        description bytea NOT NULL, greeting bytea NOT NULL, model text NOT NULL,
        version int NOT NULL, updated_at timestamptz NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS rm_conversations (
        id uuid PRIMARY KEY, owner_id uuid NOT NULL, persona_id uuid NOT NULL,
        title bytea NOT NULL, message_count int NOT NULL DEFAULT 0,
        created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS rm_conversations_owner ON rm_conversations (owner_id, updated_at DESC)",
    """CREATE TABLE IF NOT EXISTS rm_messages (
        id uuid PRIMARY KEY, conversation_id uuid NOT NULL, seq int NOT NULL,
        role text NOT NULL, text bytea NOT NULL, status text NOT NULL,
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
        title bytea NOT NULL, persona_name bytea NOT NULL, messages bytea NOT NULL,
        created_at timestamptz NOT NULL, revoked boolean NOT NULL DEFAULT false)""",
    "CREATE INDEX IF NOT EXISTS rm_shares_conversation ON rm_shares (conversation_id)",
    "CREATE INDEX IF NOT EXISTS rm_shares_owner ON rm_shares (owner_id) WHERE NOT revoked",  # a user's links
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
    # sealed text (projections/sealing.py): the blind indexes that search reads (a search
    # reads one user's conversations by rm_conversations_owner and their messages by
    # rm_messages_order, so no index of its own)
    "ALTER TABLE rm_conversations ADD COLUMN IF NOT EXISTS title_words bigint[] NOT NULL DEFAULT '{}'",
    "ALTER TABLE rm_messages ADD COLUMN IF NOT EXISTS words bigint[] NOT NULL DEFAULT '{}'",
    "ALTER TABLE rm_messages ADD COLUMN IF NOT EXISTS feedback_comment bytea",  # sealed, like the text
    "ALTER TABLE rm_messages ADD COLUMN IF NOT EXISTS imported boolean NOT NULL DEFAULT false",  # from an export
    # chats started through /v1 with a key whose chats are listed apart (Conversation.ListedApart)
    "ALTER TABLE rm_conversations ADD COLUMN IF NOT EXISTS via_api boolean NOT NULL DEFAULT false",
    "ALTER TABLE rm_conversations ADD COLUMN IF NOT EXISTS pinned boolean NOT NULL DEFAULT false",  # PinSet
    # chats started and left empty, which the retention job discards after a day
    "CREATE INDEX IF NOT EXISTS rm_conversations_empty ON rm_conversations (created_at) WHERE message_count = 0",
]
PERSONA_COLUMNS = ("name", "description", "greeting", "model", "avatar", "visibility", "retired")
OWNERS_MAX = 65536  # conversation owners a recorder remembers

APPLICATION = "chat"  # the notification log the projections follow


LIVE_PREFIX = "rm_"
TABLES = ("personas", "conversations", "messages", "usage", "shares", "owners")


class ReadModelRecorder(ReadModelQueries, PostgresTrackingRecorder):
    """`prefix` names the tables: `rm_` are the live ones; a rebuild fills `rb_` ones."""

    def __init__(self, *args: Any, prefix: str = LIVE_PREFIX, keys: KeyStore | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prefix = prefix
        self.sealer = Sealer(keys)
        self._owners: dict[UUID, UUID] = {}  # conversation -> owner (never changes)
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

    # -- sealing (projections/sealing.py) ----------------------------------------------------

    def _remember_owner(self, conversation_id: UUID, owner_id: UUID) -> None:
        if len(self._owners) >= OWNERS_MAX:
            self._owners.clear()
        self._owners[conversation_id] = owner_id

    def _lookup(self, curs: Any, sql: str, params: Any) -> DictRow | None:
        """One row, read inside the write's transaction. On a cursor of its own: in a batch's
        pipeline the write cursor may still have an earlier statement's result pending, which
        its fetch would take for this one; a fresh cursor's fetch waits for its own."""
        with curs.connection.cursor(row_factory=dict_row) as lookup:
            lookup.execute(self.sql(sql), params)
            return lookup.fetchone()

    def _owner(self, curs: Any, conversation_id: UUID) -> UUID | None:
        """Whose key seals the conversation's text: its row's `owner_id` (None: it is gone)."""
        owner = self._owners.get(conversation_id)
        if owner is None:
            found = self._lookup(curs, "SELECT owner_id FROM rm_conversations WHERE id = %s", (conversation_id,))
            if found is None:
                return None
            owner = found["owner_id"]
            self._remember_owner(conversation_id, owner)
        return owner

    def _seal_title(self, owner: UUID | None, conversation_id: UUID, title: str) -> dict[str, Any]:
        return {"title": self.sealer.seal(owner, title, "rm_conversations.title", conversation_id),
                "title_words": self.sealer.index(owner, title)}

    def _seal_text(self, curs: Any, conversation_id: UUID, message_id: UUID, text: str) -> dict[str, Any]:
        owner = self._owner(curs, conversation_id)
        return {"text": self.sealer.seal(owner, text, "rm_messages.text", message_id),
                "words": self.sealer.index(owner, text) if owner is not None else "{}"}

    def _seal_persona(self, persona_id: UUID, columns: dict[str, Any]) -> dict[str, Any]:
        return {k: self.sealer.seal(None, columns[k], f"rm_personas.{k}", persona_id)
                for k in PERSONA_SEALED if k in columns}

    # -- writes (each with its tracking, in one transaction) -------------------------------

    def skip(self, tracking: Tracking) -> None:
        """Record the position of an event no read model needs."""
        with self._tx() as curs:
            self._insert_tracking(curs, tracking)

    def upsert_persona(self, tracking: Tracking, row: dict[str, Any]) -> None:
        row = {**row, **self._seal_persona(row["id"], row)}
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
        columns.update(self._seal_persona(persona_id, columns))
        sets = "".join(f", {k} = %({k})s" for k in columns)  # names from PERSONA_COLUMNS only
        with self._tx() as curs:
            self._insert_tracking(curs, tracking)
            self._exec(
                curs, f"UPDATE rm_personas SET version = %(version)s, updated_at = %(at)s{sets} WHERE id = %(id)s",
                {**columns, "version": version, "at": at, "id": persona_id},
            )

    def insert_conversation(self, tracking: Tracking, row: dict[str, Any]) -> None:
        self._remember_owner(row["id"], row["owner_id"])
        row = {**row, **self._seal_title(row["owner_id"], row["id"], row["title"])}
        with self._tx() as curs:
            self._insert_tracking(curs, tracking)
            self._exec(
                curs, "INSERT INTO rm_conversations (id, owner_id, persona_id, title, title_words, created_at, updated_at)"
                " VALUES (%(id)s, %(owner_id)s, %(persona_id)s, %(title)s, %(title_words)s::bigint[], %(at)s, %(at)s)",
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
        if self._owner(curs, row["conversation_id"]) is None:
            return  # the conversation is gone: no row (user text is never sealed but under its owner's key)
        row = {"imported": False, **row, **self._seal_text(curs, row["conversation_id"], row["id"], row["text"])}
        self._exec(
            curs, "INSERT INTO rm_messages (id, conversation_id, seq, role, text, words, status, reply_to, parent_id,"
            " imported, created_at, updated_at)"
            " SELECT %(id)s, %(conversation_id)s, coalesce(max(seq), 0) + 1, %(role)s, %(text)s, %(words)s::bigint[], %(status)s,"
            " %(reply_to)s, %(parent_id)s, %(imported)s, %(at)s, %(at)s"
            " FROM rm_messages WHERE conversation_id = %(conversation_id)s",
            row,
        )

    def update_conversation(self, tracking: Tracking, conversation_id: UUID, changes: dict[str, Any]) -> None:
        """Set the title, archived or pinned flag, current leaf, expiry or `via_api` (names from a
        fixed set only)."""
        columns = {k: v for k, v in changes.items()
                   if k in ("title", "archived", "current_leaf", "expires_at", "via_api", "pinned")}
        with self._tx() as curs:
            if "title" in columns:
                owner = self._owner(curs, conversation_id)
                columns.update(self._seal_title(owner, conversation_id, columns["title"]))
            sets = ", ".join(f"{k} = %({k})s" for k in columns)
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
            sealed_title = {"title": None, "title_words": None}
            if title is not None:
                sealed_title = self._seal_title(self._owner(curs, conversation_id), conversation_id, title)
            for node in nodes:
                self._insert_message(curs, {
                    "id": node["id"], "conversation_id": conversation_id, "role": node["role"],
                    "text": node["text"], "status": "complete", "reply_to": None,
                    "parent_id": node["parent_id"], "at": at, "imported": True,
                })
            self._exec(
                curs, "UPDATE rm_conversations SET message_count = message_count + %(n)s, updated_at = %(at)s,"
                " current_leaf = %(leaf)s, title = coalesce(%(title)s::bytea, title),"
                " title_words = coalesce(%(title_words)s::text::bigint[], title_words) WHERE id = %(cid)s",
                {"n": len(nodes), "at": at, "cid": conversation_id, "leaf": current, **sealed_title},
            )

    def add_share(self, tracking: Tracking, row: dict[str, Any]) -> None:
        """A snapshot shared by link, sealed under the owner's key like the conversation."""
        with self._tx() as curs:
            self._insert_tracking(curs, tracking)
            found = self._lookup(
                curs, "SELECT c.owner_id, p.id AS persona_id, p.name FROM rm_conversations c"
                " LEFT JOIN rm_personas p ON p.id = c.persona_id WHERE c.id = %s", (row["conversation_id"],))
            if found is None:
                return  # the conversation is gone: nothing to share
            owner, share_id = found["owner_id"], row["id"]
            persona_name = "" if found["persona_id"] is None else (
                self.sealer.open(None, found["name"], "rm_personas.name", found["persona_id"]) or "")
            self._exec(
                curs, "INSERT INTO rm_shares (id, conversation_id, owner_id, title, persona_name, messages, created_at)"
                " VALUES (%(id)s, %(conversation_id)s, %(owner)s, %(title)s, %(persona_name)s, %(messages)s, %(at)s)",
                {**row, "owner": owner,
                 "title": self.sealer.seal(owner, row["title"], "rm_shares.title", share_id),
                 "persona_name": self.sealer.seal(owner, persona_name, "rm_shares.persona_name", share_id),
                 "messages": self.sealer.seal(owner, json.dumps(row["messages"]), "rm_shares.messages", share_id)},
            )

    def revoke_share(self, tracking: Tracking, share_id: UUID) -> None:
        with self._tx() as curs:
            self._insert_tracking(curs, tracking)
            self._exec(curs, "UPDATE rm_shares SET revoked = true WHERE id = %(id)s", {"id": share_id})

    def rate_reply(self, tracking: Tracking, conversation_id: UUID, reply_id: UUID, rating: str | None,
                   comment: str) -> None:
        """The reply's rating (None: taken back) and the comment with it."""
        with self._tx() as curs:
            sealed = None
            if comment:
                owner = self._owner(curs, conversation_id)
                sealed = self.sealer.seal(owner, comment, "rm_messages.feedback_comment", reply_id)
            self._insert_tracking(curs, tracking)
            self._exec(curs, "UPDATE rm_messages SET feedback = %s, feedback_comment = %s WHERE id = %s",
                       (rating, sealed, reply_id))

    def finish_reply(self, tracking: Tracking, row: dict[str, Any]) -> None:
        with self._tx() as curs:
            row = {**row, **self._seal_text(curs, row["conversation_id"], row["id"], row["text"])}
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
                curs, "UPDATE rm_messages SET text = %(text)s, words = %(words)s::bigint[], status = %(status)s,"
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

    def holds_plaintext(self) -> bool:
        """Whether these tables were made by a version that stored text in plaintext
        (`rm_messages.text` of type text): a rebuild replaces them with sealed ones."""
        rows = self._query(
            "SELECT data_type FROM information_schema.columns WHERE table_schema = current_schema()"
            " AND table_name = %(table)s AND column_name = 'text'", {"table": self.sql("rm_messages")})
        return bool(rows) and rows[0]["data_type"] == "text"

    # -- where the projection stands (the reads: projections/queries.py) ---------------------

    def position(self) -> int:
        return self.max_tracking_id(APPLICATION) or 0


def read_model_recorder(pg_env: dict[str, str], prefix: str = LIVE_PREFIX,
                        keys: KeyStore | None = None) -> ReadModelRecorder:
    """Build the recorder on its own connection pool. The live tables track their position
    in `readmodels_tracking`; a rebuild's tables in `rebuild_tracking`. `keys` (the event
    store's) seal and open the user text; a recorder without them writes and reads plain
    UTF-8, and is only for set-up and for what reads no text (sessions, limits)."""
    name = "readmodels" if prefix == LIVE_PREFIX else "rebuild"
    factory = PostgresFactory(Environment(name=name, env=pg_env))
    recorder = ReadModelRecorder(datastore=factory.datastore, tracking_table_name=f"{name}_tracking", prefix=prefix,
                                 keys=keys)
    if factory.env_create_table():
        recorder.create_table()
    return recorder
