"""Replies: the job a worker reads to write one, its outcome, and the user's rating of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable
from uuid import UUID

from domain.app_accounts import AccountCommands
from domain.conversation import Conversation
from domain.conversation_errors import ConversationNotFound, ReplyAlreadyFinished
from domain.persona import Persona, system_prompt


@dataclass(frozen=True)
class ReplyJob:
    """What a worker needs to write one reply, read from the events alone."""

    conversation_id: UUID
    reply_id: UUID
    owner_id: UUID
    model: str
    params: dict[str, Any]
    messages: list[dict[str, str]]  # system prompt first, then the turns
    status: str  # "pending" | "complete" | "failed"
    outcome: dict[str, Any] = field(default_factory=dict)
    untitled: bool = False  # the conversation's first reply: its completion titles it


class ReplyCommands(AccountCommands):
    """The reply jobs of the workers and their outcomes; a prompt's `{{user_name}}` is the
    account's (AccountCommands)."""

    def reply_job(self, conversation_id: UUID, reply_id: UUID) -> ReplyJob:
        conversation = self._get(Conversation, conversation_id, ConversationNotFound)
        request = conversation.reply(reply_id)
        prompt = system_prompt(self._system_prompt(request["persona_id"], request["persona_version"]),
                               self._user_name(conversation.owner_id), conversation.instructions)
        messages = [{"role": "system", "content": prompt}]
        messages += conversation.history_for(reply_id)
        outcome = {k: v for k, v in request.items() if k not in ("params", "persona_id")}
        return ReplyJob(
            conversation_id=conversation_id,
            reply_id=reply_id,
            owner_id=conversation.owner_id,
            model=request["model"],
            params=dict(request["params"]),
            messages=messages,
            status=request["status"],
            outcome=outcome,
            untitled=conversation.title == "New chat" and not conversation.titled_by_user,
        )

    def give_feedback(self, conversation_id: UUID, user_id: UUID, reply_id: UUID, rating: str,
                      comment: str | None = None) -> None:
        """Rate a reply; `comment` None keeps the comment it has (Conversation.give_feedback)."""
        self._change_owned(conversation_id, user_id, lambda c: c.give_feedback(reply_id, rating, comment))

    def clear_feedback(self, conversation_id: UUID, user_id: UUID, reply_id: UUID) -> None:
        self._change_owned(conversation_id, user_id, lambda c: c.clear_feedback(reply_id))

    def complete_reply(self, conversation_id: UUID, reply_id: UUID, **outcome: Any) -> bool:
        """Record the reply; False when an outcome was already recorded (a redelivery)."""
        return self._record_outcome(conversation_id, lambda c: c.complete_reply(reply_id, **outcome))

    def fail_reply(self, conversation_id: UUID, reply_id: UUID, error: str) -> bool:
        return self._record_outcome(conversation_id, lambda c: c.fail_reply(reply_id, error))

    def _system_prompt(self, persona_id: UUID, version: int) -> str:
        """A persona version never changes, so its prompt is cached for good."""
        key = (persona_id, version)
        if key not in self._prompt_cache:
            persona: Persona = self.repository.get(persona_id, version=version)
            if len(self._prompt_cache) > 10_000:
                self._prompt_cache.clear()
            self._prompt_cache[key] = persona.system_prompt
        return self._prompt_cache[key]

    def _record_outcome(self, conversation_id: UUID, command: Callable[[Conversation], None]) -> bool:
        def attempt() -> bool:
            conversation = self._get(Conversation, conversation_id, ConversationNotFound)
            try:
                command(conversation)
            except ReplyAlreadyFinished:
                return False
            self.save(conversation)
            return True

        return self._retry_races(attempt)
