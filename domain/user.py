"""The `User` aggregate: an account identified by its e-mail address."""

from __future__ import annotations

import re
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.ids import normalize_email, user_id_for

EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
MIN_PASSWORD = 8
MAX_PASSWORD = 256


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


def check_email(email: str) -> str:
    email = normalize_email(email)
    if len(email) > 254 or not EMAIL_RE.match(email):
        raise InvalidEmail("enter a valid e-mail address")
    return email


def check_password(password: str) -> None:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise WeakPassword(f"a password has {MIN_PASSWORD} to {MAX_PASSWORD} characters")


class User(Aggregate):
    @staticmethod
    def create_id(email: str) -> UUID:
        return user_id_for(email)

    @event("Registered")
    def __init__(self, email: str, password_hash: str) -> None:
        self.email = email
        self.password_hash = password_hash

    @event("PasswordRehashed")
    def rehash_password(self, password_hash: str) -> None:
        self.password_hash = password_hash
