"""Deterministic ids for lookup aggregates: an e-mail address, a persona by slug.

Users themselves have random ids (they are shown to other users, as the owner of a public
persona, and an id derived from the address would let anyone confirm a guessed address
offline); the `EmailAddress` lookup aggregate, whose id is derived from the address and
never leaves the server, maps an address to its user. Accounts registered before that
have the id `user_id_for(email)`, which is still looked up as a fallback."""

from __future__ import annotations

from uuid import UUID, uuid5

NAMESPACE = UUID("6f1c3f0e-5a53-4d4e-9f0b-8f5b8c2f6a10")


def user_id_for(email: str) -> UUID:
    """The id of an account registered before users had random ids."""
    return uuid5(NAMESPACE, "user:" + normalize_email(email))


def email_key_for(email: str) -> UUID:
    """The id of the `EmailAddress` lookup aggregate of an address (server-side only)."""
    return uuid5(NAMESPACE, "email:" + normalize_email(email))


def persona_id_for(slug: str, owner_id: UUID | None = None) -> UUID:
    """A built-in persona's id by its slug; a user's persona's by its creator and slug, so
    slugs are unique per creator and taking one says nothing about other users' personas.
    (Personas created before that have the built-in form of id: still found by it.)"""
    return uuid5(NAMESPACE, "persona:" + slug if owner_id is None else f"persona:{owner_id}:{slug}")


def normalize_email(email: str) -> str:
    return email.strip().lower()
