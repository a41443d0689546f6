"""The `Conversation` aggregate: a thread of user messages and bot replies.

A user message and the request for its reply are recorded together (`UserMessagePosted`
then `ReplyRequested`, saved atomically), with the persona version and sampling parameters
pinned in the request so the worker needs nothing mutable to do its job. Every request
ends in exactly one outcome: `ReplyCompleted` or `ReplyFailed`; recording a second outcome
raises `ReplyAlreadyFinished`, which is how a redelivered request is recognised.
`client_message_id` makes a retried send a no-op that returns the original ids.

Messages form a tree: each message names its parent. Regenerating a reply requests a new
reply to the same user message (a sibling); editing a user message posts a new message
beside it (same parent) and requests its reply: a new branch. The conversation's
`current` leaf names the active branch, the path from the root to it; selecting a
branch moves it. History for a reply is the path from the root to the reply's message.

A conversation is titled after its first reply (`Titled`, from the first message, unless
the user already renamed it), and can be renamed, archived and deleted. A temporary one
(`RetentionSet`) expires at a chosen time: a scheduled job records `Expired`. The same job
records `Discarded` for a conversation started and left without a message for a day (never
one the user renamed, archived or pinned). A deleted, expired or discarded conversation
answers every command and query as if it did not exist; its events stay in the log (the
audit trail), encrypted like everything else.

A conversation held elsewhere (the `messages` of an OpenAI-style request) is brought in with
`import_turns` before its first posted message: `TurnsImported` records the earlier user and
assistant turns, which `history_for` then puts in the prompt like any others, and extra
system instructions, which the application appends to the persona's system prompt. One started
through the API with a key whose chats are kept out of the chat list is marked `ListedApart`
(with the key's id), in the same save as its start.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid4

from eventsourcing.domain import Aggregate, event

from domain.conversation_errors import (
    ConversationError,
    InvalidFeedback,
    InvalidRetention,
    InvalidTurns,
    ShareNotFound,
)
from domain.conversation_rules import (
    MAX_COMMENT,
    MAX_RETENTION,
    MIN_RETENTION,
    RATINGS,
    bounded_runs,
    check_imported_tree,
    check_imported_turns,
    check_instructions,
    check_title,
    make_title,
)
from domain.conversation_tree import MessageTree

# An import is recorded as one `TreeImported` event per this many characters of text, so
# that no stored event outgrows what the event store and the broker carry (a long exported
# conversation would otherwise be one event of many megabytes).
IMPORT_EVENT_MAX_CHARS = 500_000


class Conversation(MessageTree, Aggregate):
    pinned = False  # set by PinSet; a class default, so aggregates from before pins read unpinned
    listed_apart_by: str | None = None  # the API key of ListedApart; a class default, as `pinned`

    @event("Started")
    def __init__(self, owner_id: UUID, persona_id: UUID, title: str) -> None:
        self.owner_id = owner_id
        self.persona_id = persona_id
        self.title = title
        self.titled_by_user = False
        self.title_model = ""  # the model that wrote the title ("" : made by rule, or the user's)
        self.archived = False
        self.deleted = False
        # every message of the tree, in the order written: {"id", "role", "text", "status",
        # "parent_id"}; `child_ids` lists each message's children ("" for the roots);
        # `current` is the leaf of the active branch
        self.nodes: dict[UUID, dict[str, Any]] = {}
        self.child_ids: dict[str, list[UUID]] = {}
        self.current: UUID | None = None
        self.client_message_ids: dict[str, tuple[UUID, UUID]] = {}
        self.replies: dict[UUID, dict[str, Any]] = {}
        self.instructions = ""  # system instructions imported with earlier turns
        self.shares: dict[UUID, bool] = {}  # share id -> still active
        self.expires_at: datetime | None = None  # a temporary conversation's end

    # -- commands -------------------------------------------------------------------------

    def post_message(
        self,
        client_message_id: str,
        text: str,
        persona_version: int,
        model: str,
        params: dict[str, Any],
        max_chars: int,
    ) -> tuple[UUID, UUID, bool]:
        """Record a user message and request its reply; returns (message_id, reply_id,
        created). A `client_message_id` seen before returns the original ids, unchanged."""
        if client_message_id in self.client_message_ids:
            message_id, reply_id = self.client_message_ids[client_message_id]
            return message_id, reply_id, False
        return self._post_and_request(client_message_id, text, self.current, persona_version, model, params, max_chars)

    def edit_message(
        self,
        message_id: UUID,
        client_message_id: str,
        text: str,
        persona_version: int,
        model: str,
        params: dict[str, Any],
        max_chars: int,
    ) -> tuple[UUID, UUID, bool]:
        """Start a new branch: a new user message beside `message_id` (same parent) with
        `text`, and the request for its reply. The edited message and its replies stay."""
        if client_message_id in self.client_message_ids:
            message_id, reply_id = self.client_message_ids[client_message_id]
            return message_id, reply_id, False
        edited = self.node(message_id)
        if edited["role"] != "user":
            raise ConversationError("only a user message can be edited; regenerate a reply instead")
        return self._post_and_request(
            client_message_id, text, edited["parent_id"], persona_version, model, params, max_chars
        )

    def regenerate(self, message_id: UUID, persona_version: int, model: str, params: dict[str, Any]) -> tuple[UUID, UUID]:
        """Request another reply to the user message that `message_id` answers (or to
        `message_id` itself, a user message): a sibling of the earlier replies. Returns
        (user message id, new reply id)."""
        node = self.node(message_id)
        if node["role"] == "assistant":
            parent = node["parent_id"]
            if parent is None:  # an imported conversation may begin with a reply
                raise ConversationError("a reply that answers no message cannot be regenerated")
        elif node["role"] == "user":
            parent = message_id
        else:
            raise ConversationError("that message cannot be regenerated")
        self.check_no_pending_reply()
        reply_id = uuid4()
        self._request_reply(reply_id, parent, self.persona_id, persona_version, model, params)
        return parent, reply_id

    def select_branch(self, message_id: UUID) -> UUID:
        """Make the branch through `message_id` the active one: its newest leaf becomes the
        current message. Returns that leaf."""
        self.node(message_id)
        leaf = self.newest_leaf(message_id)
        if leaf != self.current:
            self._select_branch(leaf)
        return leaf

    def rename(self, title: str) -> None:
        title = check_title(title)
        if title != self.title or not self.titled_by_user:
            self._rename(title)

    def write_title(self, title: str, model: str) -> bool:
        """The model's title replaces the one made by rule after the first reply; never a
        title the user chose, nor one a model wrote already (a request delivered twice)."""
        title = check_title(title)
        if self.titled_by_user or self.deleted or getattr(self, "title_model", "") or self.title == "New chat":
            return False
        self._title(title, model)
        return True

    def set_archived(self, archived: bool) -> None:
        if archived != self.archived:
            self._set_archived(archived)

    def set_pinned(self, pinned: bool) -> None:
        """Pin to the top of the chat list, or unpin (a no-op when already so)."""
        if pinned != self.pinned:
            self._set_pinned(pinned)

    def delete(self) -> None:
        self._delete()

    def set_retention(self, keep_for: timedelta | None, now: datetime | None = None) -> None:
        """Make the conversation temporary: it expires `keep_for` from now (None: kept)."""
        if keep_for is None:
            if self.expires_at is not None:
                self._set_retention(None)
            return
        if not MIN_RETENTION <= keep_for <= MAX_RETENTION:
            raise InvalidRetention(
                f"a temporary conversation is kept from {int(MIN_RETENTION.total_seconds())} seconds"
                f" to {MAX_RETENTION.days} days"
            )
        self._set_retention((now or datetime.now(timezone.utc)) + keep_for)

    def list_apart(self, key_id: str) -> None:
        """Keep this chat, started through the API with the key `key_id`, out of the chat list."""
        if self.nodes:
            raise ConversationError("only a new conversation is listed apart")
        self._list_apart(key_id)

    def expire(self, now: datetime | None = None) -> bool:
        """Record the expiry of a temporary conversation that is due; False if it is not."""
        now = now or datetime.now(timezone.utc)
        if self.deleted or self.expires_at is None or self.expires_at > now:
            return False
        self._expire()
        return True

    def discard_if_empty(self, older_than: timedelta, now: datetime | None = None) -> bool:
        """Record that a conversation started `older_than` ago or more and left without a
        single message is discarded; False for any other (one with a message, or renamed,
        archived or pinned: kept on purpose)."""
        now = now or datetime.now(timezone.utc)
        if self.deleted or self.nodes or self.titled_by_user or self.archived or self.pinned:
            return False
        if self.created_on > now - older_than:
            return False
        self._discard()
        return True

    def share(self) -> UUID:
        """A read-only snapshot of the active branch, behind an unguessable id."""
        share_id = uuid4()
        snapshot = [
            {"role": m["role"], "text": m["text"]}
            for m in self.branch() if m["role"] == "user" or m["status"] == "complete"
        ]
        self._share(share_id, self.title, snapshot)
        return share_id

    def revoke_share(self, share_id: UUID) -> None:
        if share_id not in self.shares:
            raise ShareNotFound(str(share_id))
        if self.shares[share_id]:
            self._revoke_share(share_id)

    def import_tree(self, nodes: list[dict[str, Any]], current: UUID | None, title: str, max_chars: int) -> None:
        """Bring in a whole conversation exported elsewhere (a tree of {"id", "parent_id",
        "role", "text"}, parents first) into this new conversation."""
        if self.nodes or self.instructions:
            raise InvalidTurns("a conversation can only be imported into a new conversation")
        check_imported_tree(nodes, current, max_chars)
        title = check_title(title or "Imported chat")
        chunks = list(bounded_runs(nodes, lambda n: len(n["text"]), IMPORT_EVENT_MAX_CHARS))
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1  # earlier parts point at their own last message
            self._import_tree(chunk, (current or nodes[-1]["id"]) if last else chunk[-1]["id"], title)

    def _post_and_request(
        self, client_message_id: str, text: str, parent_id: UUID | None,
        persona_version: int, model: str, params: dict[str, Any], max_chars: int,
    ) -> tuple[UUID, UUID, bool]:
        text = text.strip()
        self.check_message(text, max_chars)
        self.check_no_pending_reply()
        message_id, reply_id = uuid4(), uuid4()
        self._post_message(message_id, client_message_id, text, parent_id)
        self._request_reply(reply_id, message_id, self.persona_id, persona_version, model, params)
        return message_id, reply_id, True

    def import_turns(self, turns: list[dict[str, str]], instructions: str, max_chars: int) -> None:
        """Record earlier turns ({"role": "user"|"assistant", "content"}) and extra system
        instructions of a conversation that began elsewhere; only before the first message."""
        if self.nodes or self.instructions:
            raise InvalidTurns("earlier turns can only be imported into a new conversation")
        checked = [{"id": uuid4(), **turn} for turn in check_imported_turns(turns, max_chars)]
        instructions = check_instructions(instructions, max_chars)
        if checked or instructions:
            self._import_turns(checked, instructions)

    def complete_reply(
        self,
        reply_id: UUID,
        text: str,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        ttft_ms: float,
        duration_ms: float,
        model_name: str,
        model_version: str,
    ) -> None:
        self.check_reply_pending(reply_id)
        self._complete_reply(
            reply_id, text, finish_reason, prompt_tokens, completion_tokens,
            round(ttft_ms, 3), round(duration_ms, 3), model_name, model_version,
        )
        if self.title == "New chat" and not self.titled_by_user:
            # the first message posted here names it (earlier turns imported are context)
            users = [m for m in self.nodes.values() if m["role"] == "user"]
            first = next((m for m in users if not m.get("imported")), users[0] if users else None)
            if first is not None:
                self._title(make_title(first["text"]))

    def fail_reply(self, reply_id: UUID, error: str) -> None:
        self.check_reply_pending(reply_id)
        self._fail_reply(reply_id, error[:500])

    def give_feedback(self, reply_id: UUID, rating: str, comment: str | None = None) -> None:
        """Thumbs up or down on a finished reply; a later rating replaces an earlier one.
        `comment` None keeps the comment given before (a thumb clicked again); "" removes it."""
        reply = self.reply(reply_id)
        if reply["status"] == "pending":
            raise InvalidFeedback("wait for the reply to finish before rating it")
        if rating not in RATINGS:
            raise InvalidFeedback(f"a rating is one of {', '.join(RATINGS)}")
        if comment is None:
            comment = (reply.get("feedback") or {}).get("comment", "")
        if len(comment) > MAX_COMMENT:
            raise InvalidFeedback(f"a comment has at most {MAX_COMMENT} characters")
        if reply.get("feedback") != {"rating": rating, "comment": comment.strip()}:
            self._give_feedback(reply_id, rating, comment.strip())

    def clear_feedback(self, reply_id: UUID) -> None:
        """Take back the rating of a reply, and its comment (nothing to do if it has none)."""
        if self.reply(reply_id).get("feedback"):
            self._clear_feedback(reply_id)

    def record_audit(self, operator: str, reason: str) -> None:
        """Someone read this conversation through the audit tool: who, and why."""
        if not operator.strip() or not reason.strip():
            raise ConversationError("an audit names the operator and the reason")
        self._audit(operator.strip()[:200], reason.strip()[:1000])

    # -- events ---------------------------------------------------------------------------

    @event("TurnsImported")
    def _import_turns(self, turns: list[dict[str, Any]], instructions: str) -> None:
        for turn in turns:
            self._add_node({
                "id": turn["id"], "role": turn["role"], "text": turn["text"], "status": "complete",
                "imported": True, "parent_id": self.current,
            })
        self.instructions = instructions

    @event("UserMessagePosted")
    def _post_message(self, message_id: UUID, client_message_id: str, text: str, parent_id: UUID | None) -> None:
        self._add_node({
            "id": message_id, "role": "user", "text": text, "status": "complete",
            "client_message_id": client_message_id, "parent_id": parent_id,
        })

    def _add_node(self, node: dict[str, Any]) -> None:
        self.nodes[node["id"]] = node
        parent = node["parent_id"]
        self.child_ids.setdefault(str(parent) if parent else "", []).append(node["id"])
        self.current = node["id"]

    @event("BranchSelected")
    def _select_branch(self, leaf_id: UUID) -> None:
        self.current = leaf_id

    @event("Titled")
    def _title(self, title: str, model: str = "") -> None:
        """A title from the first message (by rule), or written by `model` (events from
        before titles were written have no `model`)."""
        self.title = title
        self.title_model = model

    @event("Renamed")
    def _rename(self, title: str) -> None:
        self.title = title
        self.titled_by_user = True

    @event("ArchiveSet")
    def _set_archived(self, archived: bool) -> None:
        self.archived = archived

    @event("PinSet")
    def _set_pinned(self, pinned: bool) -> None:
        self.pinned = pinned

    @event("Deleted")
    def _delete(self) -> None:
        self._hide()

    def _hide(self) -> None:
        """Deleted or expired: gone for every command and query, and so are its links."""
        self.deleted = True
        self.shares = {share_id: False for share_id in self.shares}

    @event("RetentionSet")
    def _set_retention(self, expires_at: datetime | None) -> None:
        self.expires_at = expires_at

    @event("ListedApart")
    def _list_apart(self, key_id: str) -> None:
        self.listed_apart_by = key_id

    @event("Discarded")
    def _discard(self) -> None:
        self._hide()

    @event("Expired")
    def _expire(self) -> None:
        self._hide()

    @event("Shared")
    def _share(self, share_id: UUID, title: str, messages: list[dict[str, str]]) -> None:
        self.shares[share_id] = True

    @event("ShareRevoked")
    def _revoke_share(self, share_id: UUID) -> None:
        self.shares[share_id] = False

    @event("TreeImported")
    def _import_tree(self, nodes: list[dict[str, Any]], current: UUID, title: str) -> None:
        for node in nodes:
            self._add_node({
                "id": node["id"], "role": node["role"], "text": node["text"], "status": "complete",
                "imported": True, "parent_id": node["parent_id"],
            })
        self.current = current
        self.title = title
        self.titled_by_user = True

    @event("ReplyRequested")
    def _request_reply(
        self,
        reply_id: UUID,
        message_id: UUID,
        persona_id: UUID,
        persona_version: int,
        model: str,
        params: dict[str, Any],
    ) -> None:
        posted = self.nodes[message_id]
        if posted.get("client_message_id") and posted["client_message_id"] not in self.client_message_ids:
            self.client_message_ids[posted["client_message_id"]] = (message_id, reply_id)
        self.replies[reply_id] = {
            "message_id": message_id,
            "persona_id": persona_id,
            "persona_version": persona_version,
            "model": model,
            "params": params,
            "status": "pending",
            "text": "",
        }
        self._add_node({"id": reply_id, "role": "assistant", "text": "", "status": "pending", "parent_id": message_id})

    @event("ReplyCompleted")
    def _complete_reply(
        self,
        reply_id: UUID,
        text: str,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        ttft_ms: float,
        duration_ms: float,
        model_name: str,
        model_version: str,
    ) -> None:
        self._finish(reply_id, "complete", text)
        self.replies[reply_id].update(
            finish_reason=finish_reason, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, model_name=model_name,
            model_version=model_version,
        )

    @event("Audited")
    def _audit(self, operator: str, reason: str) -> None:
        pass  # changes nothing in the conversation: it is a record of who looked

    @event("FeedbackGiven")
    def _give_feedback(self, reply_id: UUID, rating: str, comment: str) -> None:
        self.replies[reply_id]["feedback"] = {"rating": rating, "comment": comment}

    @event("FeedbackCleared")
    def _clear_feedback(self, reply_id: UUID) -> None:
        self.replies[reply_id].pop("feedback", None)

    @event("ReplyFailed")
    def _fail_reply(self, reply_id: UUID, error: str) -> None:
        self._finish(reply_id, "failed", "")
        self.replies[reply_id]["error"] = error

    def _finish(self, reply_id: UUID, status: str, text: str) -> None:
        self.replies[reply_id].update(status=status, text=text)
        self.nodes[reply_id].update(status=status, text=text)
