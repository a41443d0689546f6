"""Conversations: starting one, posting, editing and regenerating (each requests a reply),
branches, titles, retention, archive, pin and delete, and the audit record."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from domain.app_accounts import AccountCommands
from domain.app_personas import DEFAULT_PERSONA, PersonaCommands
from domain.conversation import Conversation
from domain.conversation_errors import (
    ConversationNotFound,
    MessageTooLong,
    PersonaUnavailable,
)
from domain.conversation_rules import check_sampling
from domain.ids import persona_id_for
from domain.persona import Persona, PersonaNotFound, system_prompt

TEMPLATE_ALLOWANCE = 64  # tokens a chat template adds around two messages, at most


@dataclass(frozen=True)
class PostedMessage:
    conversation_id: UUID
    message_id: UUID
    reply_id: UUID
    created: bool


class ConversationCommands(PersonaCommands, AccountCommands):
    """A user's conversations; a send reads the persona (PersonaCommands) and, for the
    prompt's `{{user_name}}`, the account (AccountCommands)."""

    # -- conversations --------------------------------------------------------------------

    def start_conversation(
        self, owner_id: UUID, persona_id: UUID | None = None, keep_for: timedelta | None = None,
    ) -> UUID:
        """A new conversation; with `keep_for`, a temporary one that expires then."""
        persona_id = persona_id or persona_id_for(DEFAULT_PERSONA)
        if not self.read_persona(persona_id).visible_to(owner_id):  # exists, usable by this user
            raise PersonaNotFound(str(persona_id))
        conversation = Conversation(owner_id=owner_id, persona_id=persona_id, title="New chat")
        if keep_for is not None:
            conversation.set_retention(keep_for)
        self.save(conversation)
        return conversation.id

    def discard_empty_conversation(
        self, conversation_id: UUID, older_than: timedelta, now: datetime | None = None,
    ) -> bool:
        """Record `Discarded` for a conversation left empty since its start `older_than` ago
        (the retention job); the events decide, not the read model that named it."""
        def attempt() -> bool:
            conversation = self._get(Conversation, conversation_id, ConversationNotFound)
            if not conversation.discard_if_empty(older_than, now):
                return False
            self.save(conversation)
            return True

        return self._retry_races(attempt)

    def expire_conversation(self, conversation_id: UUID, now: datetime | None = None) -> bool:
        """Record the expiry of a temporary conversation if it is due (the retention job)."""
        def attempt() -> bool:
            conversation = self._get(Conversation, conversation_id, ConversationNotFound)
            if not conversation.expire(now):
                return False
            self.save(conversation)
            return True

        return self._retry_races(attempt)

    def start_imported_conversation(
        self, owner_id: UUID, persona_id: UUID, turns: list[dict[str, str]], instructions: str = "",
        listed_apart_by: str | None = None,
    ) -> UUID:
        """A new conversation that already holds earlier turns and extra system instructions
        (those of an OpenAI-style request), saved in one transaction; `listed_apart_by`, the
        id of an API key whose chats are kept out of the chat list, marks it so."""
        if not self.read_persona(persona_id).visible_to(owner_id):
            raise PersonaNotFound(str(persona_id))
        conversation = Conversation(owner_id=owner_id, persona_id=persona_id, title="New chat")
        if listed_apart_by is not None:
            conversation.list_apart(listed_apart_by)
        conversation.import_turns(turns, instructions, self.max_message_chars)
        self.save(conversation)
        return conversation.id

    def conversation_owner(self, conversation_id: UUID) -> UUID:
        conversation = self._get(Conversation, conversation_id, ConversationNotFound)
        if conversation.deleted:
            raise ConversationNotFound(str(conversation_id))
        return conversation.owner_id

    def _persona_of(self, conversation: Conversation) -> Persona:
        """The persona that answers in this conversation, while its owner may still use it."""
        persona = self.read_persona(conversation.persona_id)
        if not persona.visible_to(conversation.owner_id):
            raise PersonaUnavailable(
                f"the persona {persona.name!r} was {'retired' if persona.retired else 'made private'} by its "
                "creator and answers no more messages; start a new chat with another persona"
            )
        return persona

    def post_message(
        self, conversation_id: UUID, user_id: UUID, client_message_id: str, text: str,
        sampling: dict[str, Any] | None = None,
    ) -> PostedMessage:
        """Post a user message and request its reply. `sampling` (temperature, top_p,
        max_tokens, seed) overrides the persona's parameters for this reply only; they are
        pinned in its `ReplyRequested` like the persona's."""
        overrides = check_sampling(**(sampling or {}))

        def attempt() -> PostedMessage:
            conversation = self._owned(conversation_id, user_id)
            persona = self._persona_of(conversation)
            params = self._reply_params(conversation, persona, overrides)
            self._check_fits(conversation, persona, text, params)
            message_id, reply_id, created = conversation.post_message(
                client_message_id, text, persona.version, persona.model, params, self.max_message_chars,
            )
            if created:
                self.save(conversation)
            return PostedMessage(conversation_id, message_id, reply_id, created)

        return self._retry_races(attempt)

    def edit_message(
        self, conversation_id: UUID, user_id: UUID, message_id: UUID, client_message_id: str, text: str,
    ) -> PostedMessage:
        """A new branch: `text` posted beside the user message `message_id`, and its reply."""

        def attempt() -> PostedMessage:
            conversation = self._owned(conversation_id, user_id)
            persona = self._persona_of(conversation)
            params = self._reply_params(conversation, persona, {})
            self._check_fits(conversation, persona, text, params)
            new_id, reply_id, created = conversation.edit_message(
                message_id, client_message_id, text, persona.version, persona.model, params, self.max_message_chars,
            )
            if created:
                self.save(conversation)
            return PostedMessage(conversation_id, new_id, reply_id, created)

        return self._retry_races(attempt)

    def regenerate(self, conversation_id: UUID, user_id: UUID, message_id: UUID) -> PostedMessage:
        """Another reply to the user message that `message_id` answers: a sibling reply,
        with the persona as it stands now and a fresh seed."""

        def attempt() -> PostedMessage:
            conversation = self._owned(conversation_id, user_id)
            persona = self._persona_of(conversation)
            parent, reply_id = conversation.regenerate(
                message_id, persona.version, persona.model, self._reply_params(conversation, persona, {})
            )
            self.save(conversation)
            return PostedMessage(conversation_id, parent, reply_id, True)

        return self._retry_races(attempt)

    def select_branch(self, conversation_id: UUID, user_id: UUID, message_id: UUID) -> UUID:
        """Make the branch through `message_id` the active one; returns its leaf."""

        return self._change_owned(conversation_id, user_id, lambda c: c.select_branch(message_id))

    def branch(self, conversation_id: UUID, user_id: UUID) -> list[dict[str, Any]]:
        """The active branch, root to leaf, each message with its siblings' ids."""
        conversation = self._owned(conversation_id, user_id)
        branch = []
        for node in conversation.branch():
            row = {**node, "siblings": list(conversation.children(node["parent_id"]))}
            reply = conversation.replies.get(node["id"])
            if reply is not None:
                row["reply_to"] = reply["message_id"]
                row["finish_reason"] = reply.get("finish_reason")
                if "model_name" in reply:
                    row["model"] = f"{reply['model_name']}/{reply['model_version']}"
                row["feedback"] = (reply.get("feedback") or {}).get("rating")
                row["feedback_comment"] = (reply.get("feedback") or {}).get("comment") or None
            branch.append(row)
        return branch

    def pending_reply(self, conversation_id: UUID, user_id: UUID) -> UUID | None:
        """The reply being written in the conversation, if any (at most one at a time)."""
        conversation = self._owned(conversation_id, user_id)
        return next((rid for rid, r in conversation.replies.items() if r["status"] == "pending"), None)

    def update_conversation(
        self, conversation_id: UUID, user_id: UUID, title: str | None = None, archived: bool | None = None,
        keep_for: timedelta | None | bool = False, pinned: bool | None = None,
    ) -> None:
        """Rename, archive, pin, or change retention (`keep_for`: a duration, None to keep
        the conversation for good, False to leave retention as it is)."""
        def attempt() -> None:
            conversation = self._owned(conversation_id, user_id)
            if title is not None:
                conversation.rename(title)
            if archived is not None:
                conversation.set_archived(archived)
            if pinned is not None:
                conversation.set_pinned(pinned)
            if keep_for is not False:
                conversation.set_retention(keep_for)  # type: ignore[arg-type]
            self.save(conversation)

        self._retry_races(attempt)

    def delete_conversation(self, conversation_id: UUID, user_id: UUID) -> None:
        self._change_owned(conversation_id, user_id, Conversation.delete)

    def _check_fits(self, conversation: Conversation, persona: Persona, text: str, params: dict[str, Any]) -> None:
        """Refuse a message that, with the system prompt and the reply's token budget, can
        never fit the model's context window: the worker drops older turns to fit, but not
        the newest message. Byte-level tokenizers make at most one token per UTF-8 byte, so
        a message whose bytes clearly fit is not tokenized at all."""
        if self.prompt_window is None:
            return
        system = system_prompt(persona.system_prompt, self._user_name(conversation.owner_id), conversation.instructions)
        text = text.strip()
        window = self.prompt_window.window(persona.model)
        budget = window - int(params["max_tokens"])
        if len(system.encode()) + len(text.encode()) + TEMPLATE_ALLOWANCE <= budget:
            return
        used = self.prompt_window.count(persona.model, [{"role": "system", "content": system},
                                                        {"role": "user", "content": text}])
        if used > budget:
            raise MessageTooLong(
                f"this message is too long for the model: with the persona's instructions it takes {used:,} "
                f"tokens, and at most {max(budget, 0):,} leave room for the reply ({params['max_tokens']} "
                f"tokens in a context of {window:,}); shorten it or split it over several messages"
            )

    @staticmethod
    def _reply_params(conversation: Conversation, persona: Persona, overrides: dict[str, Any]) -> dict[str, Any]:
        params = {
            "temperature": persona.temperature,
            "top_p": persona.top_p,
            "max_tokens": persona.max_tokens,
            # A pinned seed makes a redelivered request regenerate the same text; a
            # regenerated reply gets another one (the tree has grown).
            "seed": int.from_bytes(conversation.id.bytes[:4], "big") + len(conversation.nodes),
        }
        params.update(overrides)
        if persona.min_tokens:
            params["min_tokens"] = min(persona.min_tokens, params["max_tokens"])
        return params

    def write_title(self, conversation_id: UUID, title: str, model: str) -> bool:
        """Record the title `model` wrote after the first reply (see Conversation.write_title);
        False when the conversation keeps the title it has."""
        def attempt() -> bool:
            conversation = self._get(Conversation, conversation_id, ConversationNotFound)
            if not conversation.write_title(title, model):
                return False
            self.save(conversation)
            return True

        return self._retry_races(attempt)

    def record_audit(self, conversation_id: UUID, operator: str, reason: str) -> int:
        """Record that `operator` read the conversation, and why; returns the version
        the conversation had before this record."""
        def attempt() -> int:
            conversation = self._get(Conversation, conversation_id, ConversationNotFound)
            seen = conversation.version
            conversation.record_audit(operator, reason)
            self.save(conversation)
            return seen

        return self._retry_races(attempt)
