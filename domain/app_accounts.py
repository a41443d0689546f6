"""Accounts: users (registration, log-in, e-mail), their erasure, and API keys."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from argon2.exceptions import InvalidHashError, VerificationError
from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError

from domain.app_base import ChatApplicationBase
from domain.ids import email_key_for, user_id_for
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

HASH_WAIT_S = 10.0  # the longest a log-in waits for an argon2 slot


class PasswordCheckBusy(TimeoutError):
    """Every argon2 slot stayed taken for HASH_WAIT_S: the log-in was not checked."""


@dataclass(frozen=True)
class ApiKeyHolder:
    """Who a valid API key opens the API for, and whether the chats it starts are listed apart."""

    user_id: UUID
    key_id: str
    list_apart: bool


class AccountCommands(ChatApplicationBase):
    """Users, their log-ins and erasure, and their API keys."""

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
        self._forget_user(user_id)
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

    def _user_name(self, user_id: UUID) -> str:
        """What `{{user_name}}` in a system prompt becomes: the e-mail's local part."""
        if user_id not in self._name_cache:
            if len(self._name_cache) > 10_000:  # bounded: one entry per user otherwise
                self._name_cache.clear()
            self._name_cache[user_id] = self.user_email(user_id).split("@", 1)[0]
        return self._name_cache[user_id]
