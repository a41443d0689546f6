"""What every area of `ChatApplication` (domain/application.py) builds on: one eventsourcing
`Application` with the state of every area, and the helpers every command uses: `_get` (an
aggregate of one kind, or the area's not-found error; an erased user's data reads as
missing), `_owned` and `_change_owned` (a user's own, undeleted conversation), and
`_retry_races` (a command that loses an optimistic-concurrency race reloads and decides
again).

It is plain eventsourcing, and runs as it is on the library's in-memory store. What is
infrastructure (the store, the caching repository, snapshots of any state JSON can hold,
and the key store's say on whether a cached conversation may still be read) is wired in by
the event store's subclass (chatbot/eventstore/application.py).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Collection
from typing import Callable, Protocol, TypeVar
from uuid import UUID

from argon2 import PasswordHasher
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError

from domain.conversation import Conversation
from domain.conversation_errors import ConversationNotFound
from domain.user import AccountErased

T = TypeVar("T")
RACE_RETRIES = 5


class PromptWindow(Protocol):
    """What the write side needs to know of a served model's context window."""

    def window(self, model: str) -> int:
        """The model's context window, in tokens."""

    def count(self, model: str, messages: list[dict[str, str]]) -> int:
        """The tokens of `messages` rendered with the model's chat template."""


class ChatApplicationBase(Application[UUID]):
    """The one application's state and shared helpers; the areas' commands are mixed in
    by `ChatApplication`, which names the application ("chat")."""

    def __init__(self, env: dict[str, str] | None = None, *, max_message_chars: int = 8000,
                 served_models: Callable[[], Collection[str]] | None = None,
                 prompt_window: PromptWindow | None = None) -> None:
        super().__init__(env)
        self.max_message_chars = max_message_chars
        # Token counts of the served models (chatbot/inference/prompt.py's PromptBuilder), so a message
        # that could never fit the context window is refused when sent; None: not checked.
        self.prompt_window = prompt_window
        # The models a persona may name ("chat", or "chat/2" for a version): the model
        # repository's, given by the composition root; None accepts any (in-memory tests).
        self.served_models = served_models
        self.hasher = PasswordHasher()
        self._decoy_hash = ""  # checked for unknown addresses; made on the first one
        self._hash_slots = threading.BoundedSemaphore(max(1, (os.cpu_count() or 2) // 2))
        self._prompt_cache: dict[tuple[UUID, int], str] = {}
        self._name_cache: dict[UUID, str] = {}

    def _forget_user(self, user_id: UUID) -> None:
        """After an erasure: drop whatever the store keeps of the user's key in memory. The
        in-memory store keeps none; the event store's application overrides this."""

    # -- helpers every area uses ----------------------------------------------------------

    def _change_owned(self, conversation_id: UUID, user_id: UUID, change: Callable[[Conversation], T]) -> T:
        """Apply `change` to the user's conversation and save it (loaded again and retried
        if another process saved it first); returns what `change` returns."""
        def attempt() -> T:
            conversation = self._owned(conversation_id, user_id)
            result = change(conversation)
            self.save(conversation)
            return result

        return self._retry_races(attempt)

    def _owned(self, conversation_id: UUID, user_id: UUID) -> Conversation:
        conversation = self._get(Conversation, conversation_id, ConversationNotFound)
        if conversation.owner_id != user_id or conversation.deleted:
            # Same answer as a missing conversation: do not reveal that it exists.
            raise ConversationNotFound(str(conversation_id))
        return conversation

    def _get(self, cls: type[T], aggregate_id: UUID, missing: type[Exception]) -> T:
        try:
            aggregate = self.repository.get(aggregate_id)
        except (AggregateNotFoundError, AccountErased):  # an erased user's data is gone
            raise missing(str(aggregate_id)) from None
        if not isinstance(aggregate, cls):
            raise missing(str(aggregate_id))
        return aggregate

    @staticmethod
    def _retry_races(attempt: Callable[[], T]) -> T:
        for _ in range(RACE_RETRIES - 1):
            try:
                return attempt()
            except IntegrityError:
                continue  # another process saved first: reload and decide again
        return attempt()
