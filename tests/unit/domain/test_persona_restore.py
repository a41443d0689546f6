"""Restoring an earlier persona version: an edit back to its fields, never a deletion."""

from __future__ import annotations

from uuid import UUID

import pytest

from domain.application import ChatApplication
from domain.ids import persona_id_for
from domain.persona import NotPersonaOwner, PersonaVersionNotFound


def test_restoring_a_version_records_a_new_version_with_its_fields(app: ChatApplication, user: UUID) -> None:
    persona_id = app.create_persona(user, {"slug": "pal", "name": "Pal", "system_prompt": "Be kind.",
                                           "starters": ["Hi"], "temperature": 0.4})
    app.edit_persona(persona_id, user, {"name": "Best Pal", "system_prompt": "Be very kind.", "starters": []})
    app.edit_persona(persona_id, user, {"temperature": 1.2})

    assert app.restore_persona_version(persona_id, user, 1) == 4
    restored = app.visible_persona(persona_id, user)
    assert (restored["name"], restored["system_prompt"], restored["starters"], restored["temperature"]) == (
        "Pal", "Be kind.", ["Hi"], 0.4)
    versions = app.persona_versions(persona_id, user)
    assert [v["name"] for v in versions] == ["Pal", "Best Pal", "Best Pal", "Pal"]  # every version kept


def test_restoring_the_current_version_records_nothing(app: ChatApplication, user: UUID) -> None:
    persona_id = app.create_persona(user, {"slug": "pal", "name": "Pal", "system_prompt": "Be kind."})
    app.edit_persona(persona_id, user, {"name": "Best Pal"})
    assert app.restore_persona_version(persona_id, user, 2) is None
    app.edit_persona(persona_id, user, {"name": "Pal"})  # v3 equals v1
    assert app.restore_persona_version(persona_id, user, 1) is None
    assert app.visible_persona(persona_id, user)["version"] == 3


def test_only_the_creator_restores_and_only_a_version_that_exists(app: ChatApplication, user: UUID) -> None:
    persona_id = app.create_persona(user, {"slug": "pal", "name": "Pal", "system_prompt": "Be kind."})
    for missing in (0, 2, -1):
        with pytest.raises(PersonaVersionNotFound, match="no version"):
            app.restore_persona_version(persona_id, user, missing)
    stranger = app.register_user("eve@example.com", "correct horse")
    with pytest.raises(NotPersonaOwner):
        app.restore_persona_version(persona_id, stranger, 1)
    with pytest.raises(NotPersonaOwner):
        app.restore_persona_version(persona_id_for("pirate"), user, 1)  # built-in: nobody's
