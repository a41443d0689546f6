"""What a `Conversation` (domain/conversation.py) answers about its messages, and the
checks its commands make first: the tree of messages (the path to a message, the active
branch, a reply's history) and the invariants a command checks before it records anything.

A mixin of the aggregate, kept apart so the aggregate's module holds its commands and
events; it reads the state the events build (`nodes`, `child_ids`, `current`, `replies`)
and changes nothing. The aggregate's class and module, which name its stored events, are
unchanged by it.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from domain.conversation_errors import (
    MessageNotFound,
    ReplyAlreadyFinished,
    ReplyNotFound,
    ReplyStillPending,
)
from domain.conversation_rules import check_message


class MessageTree:
    """Queries over a conversation's messages (state set by `Conversation`'s events)."""

    nodes: dict[UUID, dict[str, Any]]
    child_ids: dict[str, list[UUID]]
    current: UUID | None
    replies: dict[UUID, dict[str, Any]]

    # -- queries --------------------------------------------------------------------------

    def history_for(self, reply_id: UUID) -> list[dict[str, str]]:
        """The turns that precede `reply_id`: imported turns, completed replies and the
        user messages they answer, ending with the message the reply is for."""
        request = self.replies.get(reply_id)
        if request is None:
            raise ReplyNotFound(str(reply_id))
        turns: list[dict[str, str]] = []
        for message in self.path_to(request["message_id"]):
            if message["role"] == "user" or message["status"] == "complete":
                turns.append({"role": message["role"], "content": message["text"]})
        return turns

    def path_to(self, message_id: UUID | None) -> list[dict[str, Any]]:
        """The messages from the root to `message_id`, in order."""
        path = []
        while message_id is not None:
            node = self.nodes[message_id]
            path.append(node)
            message_id = node["parent_id"]
        return path[::-1]

    def branch(self) -> list[dict[str, Any]]:
        """The active branch: the path from the root to the current leaf."""
        return self.path_to(self.current)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """Every message of the tree, in the order written."""
        return list(self.nodes.values())

    def children(self, parent_id: UUID | None) -> list[UUID]:
        return self.child_ids.get(str(parent_id) if parent_id else "", [])

    def newest_leaf(self, message_id: UUID) -> UUID:
        """Follow the newest child down from `message_id` to a leaf."""
        while children := self.children(message_id):
            message_id = children[-1]
        return message_id

    def node(self, message_id: UUID) -> dict[str, Any]:
        try:
            return self.nodes[message_id]
        except KeyError:
            raise MessageNotFound(str(message_id)) from None

    def reply(self, reply_id: UUID) -> dict[str, Any]:
        try:
            return self.replies[reply_id]
        except KeyError:
            raise ReplyNotFound(str(reply_id)) from None

    # -- invariants -----------------------------------------------------------------------

    check_message = staticmethod(check_message)

    def check_no_pending_reply(self) -> None:
        if any(r["status"] == "pending" for r in self.replies.values()):
            raise ReplyStillPending("wait for the current reply to finish before sending")

    def check_reply_pending(self, reply_id: UUID) -> None:
        if self.reply(reply_id)["status"] != "pending":
            raise ReplyAlreadyFinished(str(reply_id))
