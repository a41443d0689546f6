"""Sharing and transfer: read-only share links, and export and import of conversations."""

from __future__ import annotations

import logging
from typing import Any, Callable
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import PersistenceError

from domain.app_personas import DEFAULT_PERSONA, PersonaCommands
from domain.conversation import Conversation
from domain.conversation_errors import ConversationError
from domain.conversation_rules import bounded_runs
from domain.ids import persona_id_for
from domain.persona import PersonaNotFound
from domain.transfer import (
    ImportRecord,
    export_conversation,
    import_record_id,
    parse_export,
)
from domain.user import AccountErased, InvalidCredentials, User

log = logging.getLogger("chat")
IMPORT_BATCH_CHARS = 1_000_000  # text of the conversations an import saves in one transaction


class SharingCommands(PersonaCommands):
    """Share links, export and import; an imported conversation keeps its persona when the
    user may chat with it (PersonaCommands)."""

    # -- export, import, share ---------------------------------------------------------

    def export_conversation(self, conversation_id: UUID, user_id: UUID) -> dict[str, Any]:
        """The whole conversation (every branch) as this system's JSON export."""
        conversation = self._owned(conversation_id, user_id)
        persona = self.get_persona(conversation.persona_id).snapshot()
        timestamps: dict[UUID, Any] = {}
        for stored in self.recorder.select_events(conversation_id):
            event = self.mapper.to_domain_event(stored)
            for key in ("message_id", "reply_id"):
                node = getattr(event, key, None)
                if node is not None and node not in timestamps and node in conversation.nodes:
                    timestamps[node] = event.timestamp
            for node in getattr(event, "turns", None) or getattr(event, "nodes", None) or []:
                timestamps.setdefault(node["id"], event.timestamp)
        return export_conversation(conversation, persona, timestamps)

    def import_conversations(self, user_id: UUID, data: Any,
                             progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """ChatGPT's `conversations.json`, or this app's own export: each conversation
        becomes one of the user's (with every branch, and the persona of our export if the
        user may chat with it); those that cannot be read are skipped, with the reason, and
        so are those imported before whose conversation still exists (`duplicate`).

        Saved in batches of at most IMPORT_BATCH_CHARS characters of text, each its own
        transaction, so a big export never holds the event store for long and other users'
        saves go in between. `progress(saved, total)` is called after each batch. A batch
        that fails is not saved at all; the conversations of that batch and the later ones
        are reported as skipped with the reason, the earlier ones stay imported."""
        self._get(User, user_id, InvalidCredentials)
        parsed, skipped = parse_export(data)
        conversations: list[tuple[int, list[Any], int]] = []  # (index, [conversation, its record], characters)
        sources: set[str] = set()
        for index, item in parsed:
            earlier = self._imported_as(user_id, item.source)
            if item.source in sources or earlier is not None:
                skipped.append({"index": index, "reason": "imported already" + (f" (as “{earlier.title}”)" if earlier else ""),
                                "duplicate": True})
                continue
            conversation = Conversation(owner_id=user_id, persona_id=self._import_persona(item.persona_id, user_id),
                                        title="New chat")
            try:
                conversation.import_tree(item.nodes, item.current, item.title, self.max_message_chars)
            except ConversationError as e:
                skipped.append({"index": index, "reason": str(e)})
                continue
            sources.add(item.source)
            conversations.append((index, [conversation, self._import_record(user_id, item.source, conversation.id)],
                                  sum(len(n["text"]) for n in item.nodes)))
        saved: list[UUID] = []
        for batch in bounded_runs(conversations, lambda c: c[2], IMPORT_BATCH_CHARS):
            try:
                self.save(*(a for _, pair, _ in batch for a in pair))
            except (TimeoutError, OSError, PersistenceError) as e:
                log.warning("import for %s stopped after %d of %d conversations: %s",
                            user_id, len(saved), len(conversations), e)
                reason = f"not saved: the event store did not take it ({type(e).__name__}); nothing of it was kept"
                skipped += [{"index": i, "reason": reason} for i, _, _ in conversations[len(saved):]]
                break
            saved += [pair[0].id for _, pair, _ in batch]
            if progress is not None:
                progress(len(saved), len(conversations))
        skipped.sort(key=lambda s: s["index"])
        return {"imported": len(saved), "conversation_ids": saved, "skipped": skipped,
                "duplicates": sum(1 for s in skipped if s.get("duplicate"))}

    def _imported_as(self, user_id: UUID, source: str) -> Conversation | None:
        """The user's conversation imported from `source` before, if it still exists (our
        own export's conversation, still in the same account, counts too)."""
        candidates = []
        try:
            candidates.append(self.repository.get(import_record_id(user_id, source)).conversation_id)
        except AggregateNotFoundError:
            pass
        if source.startswith("chatbot:"):
            try:
                candidates.append(UUID(source.removeprefix("chatbot:")))
            except ValueError:
                pass
        for conversation_id in candidates:
            try:
                conversation = self.repository.get(conversation_id)
            except (AggregateNotFoundError, AccountErased):
                continue
            if isinstance(conversation, Conversation) and conversation.owner_id == user_id and not conversation.deleted:
                return conversation
        return None

    def _import_record(self, user_id: UUID, source: str, conversation_id: UUID) -> ImportRecord:
        try:
            record: ImportRecord = self.repository.get(import_record_id(user_id, source))
        except AggregateNotFoundError:
            return ImportRecord(owner_id=user_id, source=source, conversation_id=conversation_id)
        record.repeat(conversation_id)  # its conversation was deleted since
        return record

    def _import_persona(self, persona_id: UUID | None, user_id: UUID) -> UUID:
        """The persona an imported conversation was with, if the user may chat with it;
        else the default one."""
        if persona_id is not None:
            try:
                if not self.visible_persona(persona_id, user_id)["retired"]:
                    return persona_id
            except PersonaNotFound:
                pass
        return persona_id_for(DEFAULT_PERSONA)

    def share_conversation(self, conversation_id: UUID, user_id: UUID) -> UUID:
        return self._change_owned(conversation_id, user_id, Conversation.share)

    def revoke_share(self, conversation_id: UUID, user_id: UUID, share_id: UUID) -> None:
        self._change_owned(conversation_id, user_id, lambda c: c.revoke_share(share_id))
