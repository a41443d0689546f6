"""Personas: the built-in ones, a user's own, their versions, and the cached read a send uses."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError

from domain.app_base import ChatApplicationBase
from domain.ids import persona_id_for
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
)
from domain.user import AccountErased

DEFAULT_PERSONA = "assistant"
PERSONA_DEFAULTS: dict[str, Any] = {
    "description": "", "greeting": "", "model": "chat", "temperature": 0.8, "top_p": 0.95,
    "max_tokens": 96, "visibility": "private", "avatar": "", "starters": [],
}
PERSONA_FRESH_S = 0.5  # how stale a persona read for a send may be (an edit in another process)


class PersonaCommands(ChatApplicationBase):
    """Built-in and users' personas, and reading them (cached) for a send."""

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
