"""The `Conversation` aggregate: a thread of user messages and bot replies.

A user message and the request for its reply are recorded together (`UserMessagePosted`
then `ReplyRequested`, saved atomically), with the persona version and sampling parameters
pinned in the request so the worker needs nothing mutable to do its job. Every request
ends in exactly one outcome: `ReplyCompleted` or `ReplyFailed`; recording a second outcome
raises `ReplyAlreadyFinished`, which is how a redelivered request is recognised.
`client_message_id` makes a retried send a no-op that returns the original ids.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

from eventsourcing.domain import Aggregate, event

MAX_TITLE = 80


class ConversationError(Exception):
    pass


class ConversationNotFound(ConversationError):
    pass


class EmptyMessage(ConversationError):
    pass


class MessageTooLong(ConversationError):
    pass


class ReplyNotFound(ConversationError):
    pass


class ReplyAlreadyFinished(ConversationError):
    pass


class ReplyStillPending(ConversationError):
    pass


class Conversation(Aggregate):
    @event("Started")
    def __init__(self, owner_id: UUID, persona_id: UUID, title: str) -> None:
        self.owner_id = owner_id
        self.persona_id = persona_id
        self.title = title
        # ordered transcript: {"id", "role", "text", "status", "reply_to"?}
        self.messages: list[dict[str, Any]] = []
        self.client_message_ids: dict[str, tuple[UUID, UUID]] = {}
        self.replies: dict[UUID, dict[str, Any]] = {}

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
        text = text.strip()
        self.check_message(text, max_chars)
        self.check_no_pending_reply()
        message_id, reply_id = uuid4(), uuid4()
        self._post_message(message_id, client_message_id, text)
        self._request_reply(reply_id, message_id, self.persona_id, persona_version, model, params)
        return message_id, reply_id, True

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

    def fail_reply(self, reply_id: UUID, error: str) -> None:
        self.check_reply_pending(reply_id)
        self._fail_reply(reply_id, error[:500])

    # -- queries --------------------------------------------------------------------------

    def history_for(self, reply_id: UUID) -> list[dict[str, str]]:
        """The turns that precede `reply_id`: completed replies and the user messages
        they answer, ending with the message the reply is for."""
        request = self.replies.get(reply_id)
        if request is None:
            raise ReplyNotFound(str(reply_id))
        turns: list[dict[str, str]] = []
        for message in self.messages:
            if message["role"] == "user":
                turns.append({"role": "user", "content": message["text"]})
                if message["id"] == request["message_id"]:
                    break
            elif message["status"] == "complete":
                turns.append({"role": "assistant", "content": message["text"]})
        return turns

    def reply(self, reply_id: UUID) -> dict[str, Any]:
        try:
            return self.replies[reply_id]
        except KeyError:
            raise ReplyNotFound(str(reply_id)) from None

    # -- invariants -----------------------------------------------------------------------

    @staticmethod
    def check_message(text: str, max_chars: int) -> None:
        if not text:
            raise EmptyMessage("a message needs some text")
        if len(text) > max_chars:
            raise MessageTooLong(f"a message has at most {max_chars} characters, this one has {len(text)}")

    def check_no_pending_reply(self) -> None:
        if any(r["status"] == "pending" for r in self.replies.values()):
            raise ReplyStillPending("wait for the current reply to finish before sending")

    def check_reply_pending(self, reply_id: UUID) -> None:
        if self.reply(reply_id)["status"] != "pending":
            raise ReplyAlreadyFinished(str(reply_id))

    # -- events ---------------------------------------------------------------------------

    @event("UserMessagePosted")
    def _post_message(self, message_id: UUID, client_message_id: str, text: str) -> None:
        self.messages.append({
            "id": message_id, "role": "user", "text": text, "status": "complete",
            "client_message_id": client_message_id,
        })
        if self.title == "New chat":
            self.title = text[:MAX_TITLE]

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
        posted = next(m for m in reversed(self.messages) if m["id"] == message_id)
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
        self.messages.append({"id": reply_id, "role": "assistant", "text": "", "status": "pending"})

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

    @event("ReplyFailed")
    def _fail_reply(self, reply_id: UUID, error: str) -> None:
        self._finish(reply_id, "failed", "")
        self.replies[reply_id]["error"] = error

    def _finish(self, reply_id: UUID, status: str, text: str) -> None:
        self.replies[reply_id].update(status=status, text=text)
        for message in self.messages:
            if message["id"] == reply_id:
                message.update(status=status, text=text)
