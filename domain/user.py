"""The `User` aggregate: an account with a random id and an e-mail address, its API keys,
and the `EmailAddress` lookup aggregate that finds it by address (domain/ids.py).

An API key reads `sk-chat-<key id>-<secret>`: the key id (16 hex digits) is printed in the
key, so the `ApiKey` lookup aggregate, whose id is `uuid5(NAMESPACE, "apikey:" + key id)`,
is found with one read. Only the SHA-256 of the secret is stored (a 256-bit random secret
needs no slow password hash) and compared in constant time; the full key is shown once.

Each key has a setting, `list_apart` (on unless chosen otherwise; keys made before it existed
read as on): the chats a key starts through `/v1` are then marked `ListedApart`, so the chat
list can keep them out of the way. A key made from a page form carries the form's client id,
so a form sent twice (a reload of the page that showed the key) cannot make a second key.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, event

from domain.ids import NAMESPACE, normalize_email

EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
MIN_PASSWORD = 8
MAX_PASSWORD = 256
API_KEY_PREFIX = "sk-chat-"
API_KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")
MAX_API_KEY_NAME = 100
MAX_API_KEYS = 50  # active keys per user
MAX_CLIENT_ID = 64  # a form's client id, which makes sending it twice harmless


class UserError(Exception):
    pass


class InvalidEmail(UserError):
    pass


class WeakPassword(UserError):
    pass


class EmailAlreadyRegistered(UserError):
    pass


class InvalidCredentials(UserError):
    pass


class ApiKeyNotFound(UserError):
    pass


class TooManyApiKeys(UserError):
    pass


class ApiKeyAlreadyMade(UserError):
    """A form that made a key was sent again: no second key, and the first one's secret
    cannot be shown again (only its hash is kept)."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"the key {key_id} was made with this form already")
        self.key_id = key_id


class InvalidApiKeyName(UserError):
    pass


class UserNotFound(UserError):
    pass


class AccountErased(InvalidCredentials):
    """The account was erased: its data key is destroyed, so nothing of it can be read and
    nothing more can be recorded for it. To a caller it is as if it never existed."""


ERASERS = ("user", "operator")  # who may erase an account: its owner, or an operator


def check_email(email: str) -> str:
    email = normalize_email(email)
    if len(email) > 254 or not EMAIL_RE.match(email):
        raise InvalidEmail("enter a valid e-mail address")
    return email


COMMON_PASSWORDS = 10_000  # the most used passwords (zxcvbn's list, from real leaks) are refused


@lru_cache(maxsize=1)
def common_passwords() -> frozenset[str]:
    from zxcvbn.frequency_lists import FREQUENCY_LISTS  # loaded on the first check

    return frozenset(FREQUENCY_LISTS["passwords"][:COMMON_PASSWORDS])


def check_password(password: str, email: str = "") -> None:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise WeakPassword(f"a password has {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    lowered = password.lower()
    if lowered in common_passwords() or len(set(lowered)) < 3:
        raise WeakPassword("that password is one of the most common ones, which are guessed first: choose another")
    if email and lowered in {email.lower(), email.split("@", 1)[0].lower()}:
        raise WeakPassword("a password cannot be your e-mail address")


def check_api_key_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= MAX_API_KEY_NAME:
        raise InvalidApiKeyName(f"an API key's name has 1 to {MAX_API_KEY_NAME} characters")
    return name


def check_list_apart(list_apart: object) -> bool:
    if not isinstance(list_apart, bool):
        raise UserError("list_apart is true or false")
    return list_apart


def new_api_key() -> tuple[str, str]:
    """A fresh (key id, full key)."""
    key_id = secrets.token_hex(8)
    return key_id, f"{API_KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"


def parse_api_key(key: str) -> tuple[str, str]:
    """`sk-chat-<key id>-<secret>` -> (key id, secret); InvalidCredentials if malformed."""
    key_id, dash, secret = key.removeprefix(API_KEY_PREFIX).partition("-")
    if not key.startswith(API_KEY_PREFIX) or not dash or not secret or not API_KEY_ID_RE.match(key_id):
        raise InvalidCredentials("invalid API key")
    return key_id, secret


def hash_api_key_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def api_key_aggregate_id(key_id: str) -> UUID:
    return uuid5(NAMESPACE, "apikey:" + key_id)


class User(Aggregate):
    """A random id (eventsourcing's default): see domain/ids.py for why."""

    @event("Registered")
    def __init__(self, email: str, password_hash: str) -> None:
        self.email = email
        self.password_hash = password_hash
        # key id -> {"key_id", "name", "key_hash", "revoked", "list_apart", "created_at"}
        self.api_keys: dict[str, dict[str, Any]] = {}
        self.api_key_clients: dict[str, str] = {}  # a form's client id -> the key it made
        self.training_consent = False  # nobody's messages train a model until they opt in

    @event("PasswordRehashed")
    def rehash_password(self, password_hash: str) -> None:
        self.password_hash = password_hash

    # -- API keys -------------------------------------------------------------------------
    # The user is the source of truth for its keys (names, hashes, revocations); the
    # `ApiKey` aggregate below is a lookup copy saved in the same transaction.

    def create_api_key(
        self, key_id: str, key_hash: str, name: str, list_apart: bool = True, client_id: str = "",
    ) -> None:
        name = check_api_key_name(name)
        list_apart = check_list_apart(list_apart)
        if len(client_id) > MAX_CLIENT_ID:
            raise UserError(f"a client id has at most {MAX_CLIENT_ID} characters")
        made = getattr(self, "api_key_clients", {}).get(client_id) if client_id else None
        if made is not None:
            raise ApiKeyAlreadyMade(made)
        self.check_api_key_room()
        self._create_api_key(key_id, key_hash, name, list_apart, client_id, datetime.now(timezone.utc))

    def set_api_key_listing(self, key_id: str, list_apart: bool) -> bool:
        """List the chats the key starts apart, or not; False when it was so already."""
        list_apart = check_list_apart(list_apart)
        key = self.api_keys.get(key_id)
        if key is None:
            raise ApiKeyNotFound(key_id)
        if key["revoked"]:
            raise ApiKeyNotFound(f"the key {key_id} is revoked")
        if key.get("list_apart", True) == list_apart:
            return False
        self._set_api_key_listing(key_id, list_apart)
        return True

    def revoke_api_key(self, key_id: str) -> bool:
        """Revoke one of this user's keys; False when it was revoked already."""
        key = self.api_keys.get(key_id)
        if key is None:
            raise ApiKeyNotFound(key_id)
        if key["revoked"]:
            return False
        self._revoke_api_key(key_id)
        return True

    def check_api_key_room(self) -> None:
        active = sum(not k["revoked"] for k in self.api_keys.values())
        if active >= MAX_API_KEYS:
            raise TooManyApiKeys(f"a user has at most {MAX_API_KEYS} active API keys: revoke one first")

    @event("ApiKeyCreated")
    def _create_api_key(
        self, key_id: str, key_hash: str, name: str, list_apart: bool = True, client_id: str = "",
        created_at: datetime | None = None,
    ) -> None:
        """Keys made before the setting, the client id and the time were recorded read as
        listed apart, made by no form, at an unknown time (None)."""
        self.api_keys[key_id] = {"key_id": key_id, "name": name, "key_hash": key_hash, "revoked": False,
                                 "list_apart": list_apart, "created_at": created_at}
        if client_id:
            if not hasattr(self, "api_key_clients"):
                self.api_key_clients = {}
            self.api_key_clients[client_id] = key_id

    @event("ApiKeyListingSet")
    def _set_api_key_listing(self, key_id: str, list_apart: bool) -> None:
        self.api_keys[key_id]["list_apart"] = list_apart

    @event("ApiKeyRevoked")
    def _revoke_api_key(self, key_id: str) -> None:
        self.api_keys[key_id]["revoked"] = True

    # -- consent to training --------------------------------------------------------------
    # Opt-in: a user's messages may train a model only while consent is given. The export
    # reads when each change happened from the event log, so a message keeps the consent
    # in force when it was written, and a later revocation withdraws everything.

    def set_training_consent(self, training: bool) -> bool:
        """Give or withdraw consent; False when it was so already (no event)."""
        if not isinstance(training, bool):
            raise UserError("consent to training is true or false")
        if training == self.training_consent:
            return False
        self._set_training_consent(training)
        return True

    @event("TrainingConsentChanged")
    def _set_training_consent(self, training: bool) -> None:
        self.training_consent = training

    # -- erasure --------------------------------------------------------------------------
    # `Erased` holds no personal data: it is stored under the master key, so it stays
    # readable after the user's own key (under which every earlier event is encrypted)
    # is destroyed in the same transaction.

    def erase(self, by: str) -> None:
        if by not in ERASERS:
            raise UserError(f"an account is erased by one of {', '.join(ERASERS)}")
        self._erase(by)

    @event("Erased")
    def _erase(self, by: str) -> None:
        self.erased = True
        self.email = ""
        self.password_hash = ""
        self.api_keys = {}
        self.api_key_clients = {}


class EmailAddress(Aggregate):
    """The lookup aggregate of an e-mail address: its id is derived from the address
    (`email_key_for`), so registering the same address twice conflicts on it, and logging in
    finds the user with one read. It holds no address, only the user's id, and is stored under
    the master key: after an erasure it keeps the address taken, as the erased account did."""

    @staticmethod
    def create_id(email_key: UUID, **_: object) -> UUID:
        return email_key

    @event("Claimed")
    def __init__(self, email_key: UUID, user_id: UUID) -> None:
        self.user_id = user_id


class ApiKey(Aggregate):
    """The lookup aggregate of one API key: its id is derived from the key id printed in
    the key, so a request's key is found with one read, without scanning users. Holds the
    owner, the SHA-256 of the secret, whether the key is revoked and whether the chats it
    starts are listed apart (a copy of the user's setting, saved with it)."""

    @staticmethod
    def create_id(key_id: str, **_: object) -> UUID:
        return api_key_aggregate_id(key_id)

    @event("Created")
    def __init__(self, key_id: str, user_id: UUID, key_hash: str, list_apart: bool = True) -> None:
        self.key_id = key_id
        self.user_id = user_id
        self.key_hash = key_hash
        self.revoked = False
        self.list_apart = list_apart

    def set_listing(self, list_apart: bool) -> None:
        if list_apart != getattr(self, "list_apart", True):
            self._set_listing(list_apart)

    @event("ListingSet")
    def _set_listing(self, list_apart: bool) -> None:
        self.list_apart = list_apart

    def revoke(self) -> None:
        if not self.revoked:
            self._revoke()

    @event("Revoked")
    def _revoke(self) -> None:
        self.revoked = True
