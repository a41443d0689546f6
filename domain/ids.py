"""Deterministic ids for lookup aggregates: a user by e-mail, a persona by slug."""

from __future__ import annotations

from uuid import UUID, uuid5

NAMESPACE = UUID("6f1c3f0e-5a53-4d4e-9f0b-8f5b8c2f6a10")


def user_id_for(email: str) -> UUID:
    return uuid5(NAMESPACE, "user:" + normalize_email(email))


def persona_id_for(slug: str) -> UUID:
    return uuid5(NAMESPACE, "persona:" + slug)


def normalize_email(email: str) -> str:
    return email.strip().lower()
