"""The reads of the read models (projections/readmodels.py): personas, pages of a user's
conversations and their search, a conversation's messages and active branch, shares, the
tokens a user used today; the sealed text opened under its owner's key
(projections/sealing.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from eventsourcing.postgres import PostgresDatastore
from psycopg.rows import DictRow

from projections.sealing import Sealer

PERSONA_SEALED = ("name", "description", "greeting")  # under the master key, as persona events are


class ReadModelQueries:
    """The reads of `ReadModelRecorder`, which provides these attributes: its datastore,
    its sealer, and `sql` (the statement for its tables)."""

    datastore: PostgresDatastore
    sealer: Sealer
    sql: Callable[[str], str]

    # -- opening sealed text (projections/sealing.py) ----------------------------------------

    def _open_persona(self, row: DictRow) -> dict[str, Any]:
        opened = {k: self.sealer.open(None, row[k], f"rm_personas.{k}", row["id"]) or "" for k in PERSONA_SEALED}
        return {**row, **opened}

    def _open_title(self, row: DictRow, owner: UUID) -> dict[str, Any]:
        return {**row, "title": self.sealer.open(owner, row["title"], "rm_conversations.title", row["id"]) or ""}

    def _open_text(self, row: DictRow, owner: UUID) -> dict[str, Any]:
        opened = {**row, "text": self.sealer.open(owner, row["text"], "rm_messages.text", row["id"]) or ""}
        if row.get("feedback_comment") is not None:
            opened["feedback_comment"] = self.sealer.open(owner, row["feedback_comment"], "rm_messages.feedback_comment",
                                                          row["id"])
        return opened

    # -- reads ------------------------------------------------------------------------------

    def _query(self, sql: str, params: dict[str, Any]) -> list[DictRow]:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self.sql(sql), params)
            return curs.fetchall()

    def personas(self, user_id: UUID | None = None) -> list[dict[str, Any]]:
        """The personas a user may chat with: public ones and their own, built-in ones first."""
        rows = self._query(
            "SELECT * FROM rm_personas WHERE NOT retired AND (visibility = 'public' OR owner_id = %(user)s)",
            {"user": user_id},
        )
        opened = [self._open_persona(row) for row in rows]
        return sorted(opened, key=lambda p: (p["owner_id"] is not None, str(p["owner_id"] or ""), p["name"]))

    def conversations(
        self, owner_id: UUID, limit: int = 50, before: datetime | None = None, query: str = "",
        archived: bool = False, *, before_id: UUID | None = None, pinned: bool | None = None,
        via_api: bool | None = None, hide_empty: bool = False, keep: UUID | None = None,
    ) -> list[dict[str, Any]]:
        """A page of the user's conversations, newest first (by their last message).

        The page starts after `before`: the `updated_at` of the previous page's last row,
        with its id as `before_id` (a tie on the time is broken by the id), or alone every
        row older than it. `query`: every word of it (case-insensitive; from 3 to 12 letters,
        also the start of a word) is in the title or in one message; a query of no words
        finds nothing. `pinned`, `via_api`: only rows with that flag (None: both).
        `hide_empty`: leave out chats without a message, except `keep` (the one on screen)."""
        terms = self.sealer.terms(owner_id, query) if query else None
        if terms == []:
            return []
        rows = self._query(
            "SELECT id, persona_id, title, message_count, archived, pinned, expires_at, via_api, created_at,"
            " updated_at FROM rm_conversations c WHERE owner_id = %(owner)s AND archived = %(archived)s"
            " AND (%(before)s::timestamptz IS NULL"
            "   OR %(before_id)s::uuid IS NULL AND updated_at < %(before)s"
            "   OR (updated_at, id) < (%(before)s, %(before_id)s::uuid))"
            " AND (%(pinned)s::boolean IS NULL OR pinned = %(pinned)s)"
            " AND (%(via_api)s::boolean IS NULL OR via_api = %(via_api)s)"
            " AND (NOT %(hide_empty)s OR message_count > 0 OR id = %(keep)s::uuid)"
            " AND (%(terms)s::bigint[] IS NULL OR title_words @> %(terms)s OR EXISTS ("
            "   SELECT 1 FROM rm_messages m WHERE m.conversation_id = c.id AND m.words @> %(terms)s))"
            " ORDER BY updated_at DESC, id DESC LIMIT %(limit)s",
            {"owner": owner_id, "limit": limit, "before": before, "before_id": before_id, "terms": terms,
             "archived": archived, "pinned": pinned, "via_api": via_api, "hide_empty": hide_empty, "keep": keep},
        )
        return [self._open_title(row, owner_id) for row in rows]

    def conversation(self, conversation_id: UUID) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM rm_conversations WHERE id = %(id)s", {"id": conversation_id})
        return self._open_title(rows[0], rows[0]["owner_id"]) if rows else None

    def messages(self, conversation_id: UUID) -> list[dict[str, Any]]:
        """Every message of the conversation's tree, in the order written."""
        rows = self._query(
            "SELECT m.id, role, text, status, reply_to, parent_id, finish_reason, model, feedback, feedback_comment,"
            " imported, m.created_at, c.owner_id FROM rm_messages m JOIN rm_conversations c ON c.id = m.conversation_id"
            " WHERE conversation_id = %(id)s ORDER BY seq",
            {"id": conversation_id},
        )
        return [self._open_text(row, row.pop("owner_id")) for row in rows]

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

    def empty_conversations(self, older_than: timedelta, limit: int = 500) -> list[UUID]:
        """Conversations without a message, started `older_than` ago or more, oldest first
        (the retention job discards them; renamed, archived or pinned ones it keeps)."""
        rows = self._query(
            "SELECT id FROM rm_conversations WHERE message_count = 0 AND created_at <= now() - %(age)s"
            " AND NOT archived AND NOT pinned ORDER BY created_at LIMIT %(limit)s",
            {"age": older_than, "limit": limit},
        )
        return [row["id"] for row in rows]

    def due_expiries(self, limit: int = 500) -> list[UUID]:
        """Temporary conversations past their time, oldest first (the retention job)."""
        rows = self._query(
            "SELECT id FROM rm_conversations WHERE expires_at <= now() ORDER BY expires_at LIMIT %(limit)s",
            {"limit": limit},
        )
        return [row["id"] for row in rows]

    def share(self, share_id: UUID) -> dict[str, Any] | None:
        """A shared snapshot anyone with the link may read (None once revoked, or once its
        owner was erased)."""
        rows = self._query(
            "SELECT id, owner_id, title, persona_name, messages, created_at FROM rm_shares"
            " WHERE id = %(id)s AND NOT revoked",
            {"id": share_id},
        )
        if not rows:
            return None
        row = rows[0]
        owner = row.pop("owner_id")
        opened = {k: self.sealer.open(owner, row[k], f"rm_shares.{k}", share_id)
                  for k in ("title", "persona_name", "messages")}
        if opened["messages"] is None:
            return None
        return {**row, "title": opened["title"] or "", "persona_name": opened["persona_name"] or "",
                "messages": json.loads(opened["messages"])}

    def shares(self, conversation_id: UUID) -> list[DictRow]:
        return self._query(
            "SELECT id, created_at, revoked FROM rm_shares WHERE conversation_id = %(id)s ORDER BY created_at",
            {"id": conversation_id},
        )

    def shares_of(self, owner_id: UUID) -> list[dict[str, Any]]:
        """The user's share links that still work, across their chats, newest first, each
        with its chat's title as it was when shared."""
        rows = self._query(
            "SELECT id, conversation_id, title, created_at FROM rm_shares"
            " WHERE owner_id = %(owner)s AND NOT revoked ORDER BY created_at DESC",
            {"owner": owner_id},
        )
        return [{**row, "title": self.sealer.open(owner_id, row["title"], "rm_shares.title", row["id"]) or ""}
                for row in rows]

    def tokens_today(self, user_id: UUID) -> int:
        rows = self._query(
            "SELECT tokens FROM rm_usage WHERE user_id = %(user)s AND day = (now() AT TIME ZONE 'UTC')::date",
            {"user": user_id},
        )
        return int(rows[0]["tokens"]) if rows else 0

    def message(self, message_id: UUID) -> dict[str, Any] | None:
        rows = self._query(
            "SELECT m.*, c.owner_id FROM rm_messages m JOIN rm_conversations c ON c.id = m.conversation_id"
            " WHERE m.id = %(id)s", {"id": message_id})
        return self._open_text(rows[0], rows[0].pop("owner_id")) if rows else None

    def messages_by_id(self, message_ids: list[UUID]) -> list[dict[str, Any]]:
        """Where each of these messages stands (those not projected yet are left out)."""
        rows = self._query(
            "SELECT m.id, status, text, finish_reason, c.owner_id FROM rm_messages m"
            " JOIN rm_conversations c ON c.id = m.conversation_id WHERE m.id = ANY(%(ids)s)", {"ids": message_ids}
        )
        return [self._open_text(row, row.pop("owner_id")) for row in rows]
