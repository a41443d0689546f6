"""`ChatApplication`: the one application of the write side.

Methods load aggregates, call commands, save, and return ids or plain snapshots, never
aggregates. Optimistic concurrency of the event store (a unique originator version) settles
races: a command that loses one reloads and decides again, which is what makes a retried
send a no-op and a second outcome for one reply impossible.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Protocol, TypeVar
from uuid import UUID

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError, PersistenceError

from domain.aggregate_cache import CachingRepository
from domain.conversation import (
    Conversation,
    ConversationError,
    ConversationNotFound,
    MessageTooLong,
    PersonaUnavailable,
    ReplyAlreadyFinished,
    bounded_runs,
    check_sampling,
)
from domain.ids import email_key_for, persona_id_for, user_id_for
from domain.model_rollout import (
    ModelRollout,
    RolloutNotFound,
    check_model_name,
    check_version,
    rollout_id_for,
)
from domain.persona import (
    BUILTIN_PERSONAS,
    EDITABLE,
    InvalidPersona,
    Persona,
    PersonaNotFound,
    PersonaVersionNotFound,
    SlugTaken,
    check_fields,
    check_slug,
    render_system_prompt,
)
from domain.snapshot import StateSnapshot, register_state_transcodings
from domain.transfer import (
    ImportRecord,
    export_conversation,
    import_record_id,
    parse_export,
)
from domain.user import (
    AccountErased,
    ApiKey,
    ApiKeyNotFound,
    EmailAddress,
    EmailAlreadyRegistered,
    InvalidCredentials,
    User,
    UserNotFound,
    api_key_aggregate_id,
    check_email,
    check_password,
    hash_api_key_secret,
    new_api_key,
    parse_api_key,
)

T = TypeVar("T")
log = logging.getLogger("chat")
DEFAULT_PERSONA = "assistant"
PERSONA_DEFAULTS: dict[str, Any] = {
    "description": "", "greeting": "", "model": "chat", "temperature": 0.8, "top_p": 0.95,
    "max_tokens": 96, "visibility": "private", "avatar": "", "starters": [],
}
RACE_RETRIES = 5
# A conversation is snapshotted every this many events (only the newest snapshot is kept),
# so loading a long one reads its snapshot and at most this many events after it.
SNAPSHOT_INTERVAL = 100
IMPORT_BATCH_CHARS = 1_000_000  # text of the conversations an import saves in one transaction
PERSONA_FRESH_S = 0.5  # how stale a persona read for a send may be (an edit in another process)


HASH_WAIT_S = 10.0  # the longest a log-in waits for an argon2 slot


class PasswordCheckBusy(TimeoutError):
    """Every argon2 slot stayed taken for HASH_WAIT_S: the log-in was not checked."""


TEMPLATE_ALLOWANCE = 64  # tokens a chat template adds around two messages, at most


class PromptWindow(Protocol):
    """What the write side needs to know of a served model's context window."""

    def window(self, model: str) -> int:
        """The model's context window, in tokens."""

    def count(self, model: str, messages: list[dict[str, str]]) -> int:
        """The tokens of `messages` rendered with the model's chat template."""


@dataclass(frozen=True)
class PostedMessage:
    conversation_id: UUID
    message_id: UUID
    reply_id: UUID
    created: bool


@dataclass(frozen=True)
class ApiKeyHolder:
    """Who a valid API key opens the API for, and whether the chats it starts are listed apart."""

    user_id: UUID
    key_id: str
    list_apart: bool


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


class ChatApplication(Application[UUID]):
    name = "chat"
    snapshotting_intervals = {Conversation: SNAPSHOT_INTERVAL}  # type: ignore[dict-item]

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

    def register_transcodings(self, transcoder: Any) -> None:
        super().register_transcodings(transcoder)
        register_state_transcodings(transcoder)  # what snapshots of aggregate state need

    def construct_repository(self) -> CachingRepository:
        """Conversations and personas stay in memory between commands (domain/aggregate_cache.py)."""
        return CachingRepository(
            self.events, snapshot_store=self.snapshots,
            checked_out=(Conversation,), shared=(Persona,), readable=self._readable,
        )

    def _readable(self, aggregate: Any) -> None:
        """Raise AccountErased for a cached conversation whose owner's key is gone."""
        keys = getattr(self.mapper, "keys", None)  # the keyed stores (chatbot/eventstore/store.py)
        if keys is not None and isinstance(aggregate, Conversation):
            owner = keys.owner_of(aggregate.id)
            if owner is not None:
                keys.key_for(owner)

    def save(self, *objs: Any, **kwargs: Any) -> Any:
        """The library's; then the saved conversations and personas are cached. A method
        does not change an aggregate after saving it (another command may have it then)."""
        recordings = super().save(*objs, **kwargs)
        repository = self.repository
        if isinstance(repository, CachingRepository):
            repository.saved(objs)
        return recordings

    def take_snapshot(self, aggregate_id: UUID, version: int | None = None, **kwargs: Any) -> None:
        """The library's, with a snapshot class that carries any state JSON can hold."""
        assert self.snapshots is not None, "snapshotting is off (IS_SNAPSHOTTING_ENABLED)"
        aggregate = self.repository.get(aggregate_id, version=version, **kwargs)
        self.snapshots.put([StateSnapshot.take(aggregate)])

    # -- users ----------------------------------------------------------------------------

    @contextmanager
    def _hashing(self) -> Iterator[None]:
        """One of the few slots for argon2 (each hash or check takes ~50-100 ms of a core and
        64 MiB): a flood of log-ins queues here instead of starving every other request."""
        if not self._hash_slots.acquire(timeout=HASH_WAIT_S):
            raise PasswordCheckBusy("too many log-ins at once; try again in a few seconds")
        try:
            yield
        finally:
            self._hash_slots.release()

    def register_user(self, email: str, password: str) -> UUID:
        email = check_email(email)
        check_password(password, email)
        with self._hashing():
            password_hash = self.hasher.hash(password)
        taken = EmailAlreadyRegistered("this e-mail address is already registered")
        if self._legacy_user(email) is not None:  # registered before users had random ids
            raise taken
        user = User(email=email, password_hash=password_hash)
        try:
            # one transaction: the address is claimed by exactly one account, or by none
            self.save(user, EmailAddress(email_key=email_key_for(email), user_id=user.id))
        except (IntegrityError, AccountErased):  # an erased account keeps its address
            raise taken from None
        return user.id

    def user_id_by_email(self, email: str) -> UUID | None:
        """The account registered with this address, or None."""
        try:
            claim = self.repository.get(email_key_for(email))
        except AggregateNotFoundError:
            return self._legacy_user(email)
        return claim.user_id if isinstance(claim, EmailAddress) else None

    def _legacy_user(self, email: str) -> UUID | None:
        """The id of the account with this address from before random user ids, if any."""
        user_id = user_id_for(email)
        try:
            self.repository.get(user_id)
        except AggregateNotFoundError:
            return None
        except AccountErased:
            pass  # erased: it still holds its address
        return user_id

    def authenticate(self, email: str, password: str) -> UUID:
        """The user these credentials name. An unknown address costs the same argon2 check
        as a known one, and gets the same answer, so neither timing nor words tell them apart."""
        with self._hashing():
            try:
                try:
                    user_id = self.user_id_by_email(email)
                    if user_id is None:
                        raise AggregateNotFoundError(email_key_for(email))
                    user: User = self.repository.get(user_id)
                except AggregateNotFoundError:
                    if not self._decoy_hash:
                        self._decoy_hash = self.hasher.hash(secrets.token_hex(16))
                    self.hasher.verify(self._decoy_hash, password)  # as long as a real check
                    raise
                if getattr(user, "erased", False):  # read through a key still cached here
                    raise AccountErased(str(user.id))
                self.hasher.verify(user.password_hash, password)
            except (AggregateNotFoundError, VerificationError, InvalidHashError, AccountErased):
                raise InvalidCredentials("wrong e-mail address or password") from None
        if self.hasher.check_needs_rehash(user.password_hash):
            with self._hashing():
                user.rehash_password(self.hasher.hash(password))
            self.save(user)
        return user.id

    def user_email(self, user_id: UUID) -> str:
        user = self._get(User, user_id, InvalidCredentials)
        if getattr(user, "erased", False):  # read through a key still cached here
            raise AccountErased(str(user_id))
        return user.email

    def erase_user(self, user_id: UUID, by: str = "operator") -> bool:
        """Crypto-shred a user: record `User.Erased` (no personal data, under the master key)
        and destroy the user's data key in the same transaction, so every earlier event of
        theirs (and every snapshot) becomes unreadable. False if erased already."""

        def attempt() -> bool:
            try:
                user = self.repository.get(user_id)
            except AggregateNotFoundError:
                raise UserNotFound(str(user_id)) from None
            except AccountErased:
                return False
            if not isinstance(user, User):
                raise UserNotFound(str(user_id))
            user.erase(by)
            self.save(user, erase_user=user_id)  # the recorder destroys the key with the event
            return True

        erased = self._retry_races(attempt)
        forget = getattr(self.mapper, "forget_user", None)
        if forget is not None:
            forget(user_id)
        self._name_cache.pop(user_id, None)
        return erased

    def delete_account(self, user_id: UUID, password: str) -> None:
        """A user erases their own account, confirming it with their password."""
        user = self._get(User, user_id, InvalidCredentials)
        try:
            with self._hashing():
                self.hasher.verify(user.password_hash, password)
        except (VerificationError, InvalidHashError):
            raise InvalidCredentials("wrong password") from None
        self.erase_user(user_id, by="user")

    # -- API keys -------------------------------------------------------------------------

    def create_api_key(self, user_id: UUID, name: str, list_apart: bool = True, client_id: str = "") -> str:
        """A new key for the user, returned in full this once (only its hash is kept).
        `client_id` (a page form's): ApiKeyAlreadyMade if that form made a key already."""

        def attempt() -> str:
            user = self._get(User, user_id, InvalidCredentials)
            key_id, key = new_api_key()
            key_hash = hash_api_key_secret(parse_api_key(key)[1])
            user.create_api_key(key_id, key_hash, name, list_apart, client_id)
            self.save(user, ApiKey(key_id=key_id, user_id=user_id, key_hash=key_hash, list_apart=list_apart))
            return key

        return self._retry_races(attempt)

    def api_key_holder(self, key: str) -> ApiKeyHolder:
        """The owner of a valid, unrevoked key and its setting; InvalidCredentials otherwise."""
        key_id, secret = parse_api_key(key)
        api_key = self._get(ApiKey, api_key_aggregate_id(key_id), InvalidCredentials)
        if api_key.revoked or not hmac.compare_digest(api_key.key_hash, hash_api_key_secret(secret)):
            raise InvalidCredentials("invalid API key")
        return ApiKeyHolder(api_key.user_id, key_id, getattr(api_key, "list_apart", True))

    def user_for_api_key(self, key: str) -> UUID:
        """The owner of a valid, unrevoked key; InvalidCredentials otherwise."""
        return self.api_key_holder(key).user_id

    def set_api_key_listing(self, user_id: UUID, key_id: str, list_apart: bool) -> None:
        """List apart the chats one of the user's keys starts from now on, or not;
        ApiKeyNotFound if the key is not theirs or is revoked."""

        def attempt() -> None:
            user = self._get(User, user_id, InvalidCredentials)
            if user.set_api_key_listing(key_id, list_apart):
                api_key = self._get(ApiKey, api_key_aggregate_id(key_id), ApiKeyNotFound)
                api_key.set_listing(list_apart)
                self.save(user, api_key)

        self._retry_races(attempt)

    def revoke_api_key(self, user_id: UUID, key_id: str) -> None:
        """Revoke one of the user's keys (again: a no-op); ApiKeyNotFound if not theirs."""

        def attempt() -> None:
            user = self._get(User, user_id, InvalidCredentials)
            if user.revoke_api_key(key_id):
                api_key = self._get(ApiKey, api_key_aggregate_id(key_id), ApiKeyNotFound)
                api_key.revoke()
                self.save(user, api_key)

        self._retry_races(attempt)

    def api_keys(self, user_id: UUID) -> list[dict[str, Any]]:
        """The user's keys, oldest first: key id, name, whether revoked, whether its chats
        are listed apart, when made (never the hash)."""
        user = self._get(User, user_id, InvalidCredentials)
        keys = [{"list_apart": True, "created_at": None, **{k: v for k, v in key.items() if k != "key_hash"}}
                for key in user.api_keys.values()]
        if any(key["created_at"] is None for key in keys):  # keys made before the time was recorded
            made = {e.key_id: e.timestamp for e in self.events.get(user_id) if isinstance(e, User.ApiKeyCreated)}
            for key in keys:
                key["created_at"] = key["created_at"] or made.get(key["key_id"])
        return keys

    # -- personas -------------------------------------------------------------------------

    def seed_personas(self) -> list[UUID]:
        """Create the built-in personas that do not exist yet (idempotent)."""
        created = []
        for spec in BUILTIN_PERSONAS:
            persona = Persona(**spec)  # type: ignore[arg-type]
            try:
                self.save(persona)
                created.append(persona.id)
            except IntegrityError:  # already seeded, by this or another process
                self._retry_races(lambda: self._upgrade_builtin(persona.id, spec))
        return created

    def _upgrade_builtin(self, persona_id: UUID, spec: dict[str, Any]) -> None:
        persona = self.get_persona(persona_id)
        persona.upgrade_builtin(spec)
        self.save(persona)

    def get_persona(self, persona_id: UUID) -> Persona:
        return self._get(Persona, persona_id, PersonaNotFound)

    def read_persona(self, persona_id: UUID) -> Persona:
        """The persona to read, not to change (every send reads one): the cached copy
        itself, which an edit made in another process reaches within `PERSONA_FRESH_S`."""
        peek = getattr(self.repository, "peek", None)
        if peek is None:
            return self.get_persona(persona_id)
        try:
            persona = peek(persona_id, PERSONA_FRESH_S)
        except (AggregateNotFoundError, AccountErased):
            raise PersonaNotFound(str(persona_id)) from None
        if not isinstance(persona, Persona):
            raise PersonaNotFound(str(persona_id))
        return persona

    def visible_persona(self, persona_id: UUID, user_id: UUID | None) -> dict[str, Any]:
        persona = self.get_persona(persona_id)
        if not persona.visible_to(user_id) and persona.owner_id != user_id:
            raise PersonaNotFound(str(persona_id))  # private: as if it did not exist
        return persona.snapshot()

    def create_persona(self, owner_id: UUID, fields: dict[str, Any]) -> UUID:
        fields = {**PERSONA_DEFAULTS, **fields}
        check_slug(str(fields.get("slug", "")))
        check_fields(fields)
        unknown = set(fields) - set(EDITABLE) - {"slug"}
        if unknown:
            raise InvalidPersona(f"unknown fields: {', '.join(sorted(unknown))}")
        self._check_model(fields)
        if any(spec["slug"] == fields["slug"] for spec in BUILTIN_PERSONAS):
            raise SlugTaken(f"the slug {fields['slug']!r} is a built-in persona's")
        persona = Persona(owner_id=owner_id, **fields)
        try:
            self.save(persona)
        except IntegrityError:
            raise SlugTaken(f"you have a persona with the slug {fields['slug']!r} already") from None
        return persona.id

    def persona_for_model(self, user_id: UUID, model: str) -> UUID:
        """The persona an OpenAI-style `model` names for this user: one of their own by its
        slug, a built-in one by its slug, or any persona they may use by its id."""
        try:
            return UUID(model)
        except ValueError:
            pass
        for candidate in (persona_id_for(model, user_id), persona_id_for(model)):
            try:
                if self.read_persona(candidate).visible_to(user_id):
                    return candidate
            except PersonaNotFound:
                continue
        raise PersonaNotFound(model)

    def edit_persona(self, persona_id: UUID, user_id: UUID, changes: dict[str, Any]) -> int:
        """Apply an edit; returns the new version."""
        self._check_model(changes)

        def attempt() -> int:
            persona = self.get_persona(persona_id)
            persona.edit(user_id, changes)
            self.save(persona)
            return persona.version

        return self._retry_races(attempt)

    def restore_persona_version(self, persona_id: UUID, user_id: UUID, version: int) -> int | None:
        """Make an earlier version current again: an edit back to its fields, so a new
        version (replies keep the versions they pinned). Returns the new version; None when
        the current fields are that version's already (nothing is recorded)."""

        def attempt() -> int | None:
            persona = self.get_persona(persona_id)
            persona.check_owner(user_id)
            if not 1 <= version <= persona.version:
                raise PersonaVersionNotFound(f"the persona has no version {version} (it has 1 to {persona.version})")
            changes = persona.changes_back_to(self.repository.get(persona_id, version=version))
            if not changes:
                return None
            self._check_model(changes)
            persona.edit(user_id, changes)
            self.save(persona)
            return persona.version

        return self._retry_races(attempt)

    def retire_persona(self, persona_id: UUID, user_id: UUID) -> None:
        def attempt() -> None:
            persona = self.get_persona(persona_id)
            persona.retire(user_id)
            self.save(persona)

        self._retry_races(attempt)

    def _check_model(self, fields: dict[str, Any]) -> None:
        """A persona names a model the repository serves, never a path or a guess."""
        if "model" not in fields or self.served_models is None:
            return
        served = self.served_models()
        if fields["model"] not in served:
            names = ", ".join(sorted(m for m in served if "/" not in m)) or "none"
            raise InvalidPersona(f"model is one of the served models ({names}), optionally with a version: name/N")

    def persona_versions(self, persona_id: UUID, user_id: UUID | None) -> list[dict[str, Any]]:
        """Every version of the persona, oldest first, each as it stood then; to anyone but
        its creator only the versions that were public (a prompt written while the persona
        was private stays private)."""
        latest = self.visible_persona(persona_id, user_id)
        versions = (self.repository.get(persona_id, version=v).snapshot() for v in range(1, int(latest["version"]) + 1))
        owner = latest["owner_id"] is not None and latest["owner_id"] == user_id
        return [v for v in versions if owner or v["visibility"] == "public"]

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

    def _check_fits(self, conversation: Conversation, persona: Persona, text: str, params: dict[str, Any]) -> None:
        """Refuse a message that, with the system prompt and the reply's token budget, can
        never fit the model's context window: the worker drops older turns to fit, but not
        the newest message. Byte-level tokenizers make at most one token per UTF-8 byte, so
        a message whose bytes clearly fit is not tokenized at all."""
        if self.prompt_window is None:
            return
        system = render_system_prompt(persona.system_prompt, {"user_name": self._user_name(conversation.owner_id)})
        if conversation.instructions:
            system = f"{system}\n\n{conversation.instructions}"
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

    def reply_job(self, conversation_id: UUID, reply_id: UUID) -> ReplyJob:
        conversation = self._get(Conversation, conversation_id, ConversationNotFound)
        request = conversation.reply(reply_id)
        system_prompt = render_system_prompt(
            self._system_prompt(request["persona_id"], request["persona_version"]),
            {"user_name": self._user_name(conversation.owner_id)},
        )
        if conversation.instructions:  # imported with earlier turns: they extend the persona's
            system_prompt = f"{system_prompt}\n\n{conversation.instructions}"
        messages = [{"role": "system", "content": system_prompt}]
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

    def give_feedback(self, conversation_id: UUID, user_id: UUID, reply_id: UUID, rating: str,
                      comment: str | None = None) -> None:
        """Rate a reply; `comment` None keeps the comment it has (Conversation.give_feedback)."""
        self._change_owned(conversation_id, user_id, lambda c: c.give_feedback(reply_id, rating, comment))

    def clear_feedback(self, conversation_id: UUID, user_id: UUID, reply_id: UUID) -> None:
        self._change_owned(conversation_id, user_id, lambda c: c.clear_feedback(reply_id))

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

    def complete_reply(self, conversation_id: UUID, reply_id: UUID, **outcome: Any) -> bool:
        """Record the reply; False when an outcome was already recorded (a redelivery)."""
        return self._record_outcome(conversation_id, lambda c: c.complete_reply(reply_id, **outcome))

    def fail_reply(self, conversation_id: UUID, reply_id: UUID, error: str) -> bool:
        return self._record_outcome(conversation_id, lambda c: c.fail_reply(reply_id, error))

    # -- helpers --------------------------------------------------------------------------

    def _user_name(self, user_id: UUID) -> str:
        """What `{{user_name}}` in a system prompt becomes: the e-mail's local part."""
        if user_id not in self._name_cache:
            if len(self._name_cache) > 10_000:  # bounded: one entry per user otherwise
                self._name_cache.clear()
            self._name_cache[user_id] = self.user_email(user_id).split("@", 1)[0]
        return self._name_cache[user_id]

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

    # -- training: consent and model rollouts ---------------------------------------------

    def set_training_consent(self, user_id: UUID, training: bool) -> bool:
        """Give or withdraw the user's consent to training on their messages; returns the
        consent now in force."""

        def attempt() -> bool:
            user = self._get(User, user_id, InvalidCredentials)
            if user.set_training_consent(training):
                self.save(user)
            return user.training_consent

        return self._retry_races(attempt)

    def training_consent(self, user_id: UUID) -> bool:
        return bool(self._get(User, user_id, InvalidCredentials).training_consent)

    def model_rollout(self, model: str) -> dict[str, Any] | None:
        """The rollout state of a model, or None when none was ever recorded (every reply
        then goes to the version Triton serves by default)."""
        try:
            rollout: ModelRollout = self.repository.get(rollout_id_for(check_model_name(model)))
        except AggregateNotFoundError:
            return None
        return rollout.snapshot()

    def roll_out_model(self, model: str, version: str, percent: float, stable: str | None = None) -> dict[str, Any]:
        """Send `percent` of new replies to `version` of `model`. The first rollout of a
        model records `stable`, the version that served until then."""

        def attempt() -> dict[str, Any]:
            try:
                rollout: ModelRollout = self.repository.get(rollout_id_for(check_model_name(model)))
            except AggregateNotFoundError:
                if stable is None:
                    raise RolloutNotFound(f"name the stable version of {model!r}: none is recorded yet") from None
                rollout = ModelRollout(model=model, stable=check_version(stable))
            rollout.roll_out(version, percent)
            self.save(rollout)
            return rollout.snapshot()

        return self._retry_races(attempt)

    def roll_back_model(self, model: str) -> dict[str, Any]:
        """Every new reply of `model` on its stable version again."""
        return self._change_rollout(model, ModelRollout.roll_back)

    def promote_model(self, model: str) -> dict[str, Any]:
        """The version being rolled out becomes the stable one."""
        return self._change_rollout(model, ModelRollout.promote)

    def _change_rollout(self, model: str, command: Callable[[ModelRollout], Any]) -> dict[str, Any]:
        def attempt() -> dict[str, Any]:
            rollout = self._get(ModelRollout, rollout_id_for(check_model_name(model)), RolloutNotFound)
            command(rollout)
            self.save(rollout)
            return rollout.snapshot()

        return self._retry_races(attempt)
