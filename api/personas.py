"""`/api/personas`: the personas a user may chat with, their own to create, edit, retire,
and earlier versions to restore; anonymous callers see the public ones."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import msgspec
from litestar import Controller, Request, delete, get, patch, post
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_204_NO_CONTENT

from api import schemas
from api.auth import user_of
from api.services import Services


class PersonaController(Controller):
    path = "/api/personas"

    @get("/")
    async def list_personas(self, request: Request[Any, Any, Any], services: Services) -> list[schemas.Persona]:
        user_id = user_of(request, services.settings.secret_key)  # anonymous: public ones only
        rows = await services.call(services.readmodels.personas, user_id)
        return [schemas.Persona(**{k: r[k] for k in schemas.Persona.__struct_fields__}) for r in rows]

    @post("/", status_code=HTTP_201_CREATED)
    async def create_persona(
        self, services: Services, user_id: UUID, data: schemas.PersonaCreate
    ) -> schemas.PersonaDetail:
        fields = msgspec.structs.asdict(data)
        persona_id = await services.call(services.app.create_persona, user_id, fields)
        return schemas.PersonaDetail(**await services.call(services.app.visible_persona, persona_id, user_id))

    @get("/{persona_id:uuid}")
    async def get_persona(
        self, request: Request[Any, Any, Any], services: Services, persona_id: UUID
    ) -> schemas.PersonaDetail:
        user_id = user_of(request, services.settings.secret_key)
        return schemas.PersonaDetail(**await services.call(services.app.visible_persona, persona_id, user_id))

    @patch("/{persona_id:uuid}")
    async def update_persona(
        self, services: Services, user_id: UUID, persona_id: UUID, data: schemas.PersonaUpdate
    ) -> schemas.PersonaDetail:
        await services.call(services.app.visible_persona, persona_id, user_id)  # 404 before 403
        await services.call(services.app.edit_persona, persona_id, user_id, data.changes())
        return schemas.PersonaDetail(**await services.call(services.app.visible_persona, persona_id, user_id))

    @delete("/{persona_id:uuid}", status_code=HTTP_204_NO_CONTENT)
    async def retire_persona(self, services: Services, user_id: UUID, persona_id: UUID) -> None:
        await services.call(services.app.visible_persona, persona_id, user_id)
        await services.call(services.app.retire_persona, persona_id, user_id)

    @get("/{persona_id:uuid}/versions")
    async def list_persona_versions(
        self, request: Request[Any, Any, Any], services: Services, persona_id: UUID
    ) -> list[schemas.PersonaDetail]:
        user_id = user_of(request, services.settings.secret_key)
        versions = await services.call(services.app.persona_versions, persona_id, user_id)
        return [schemas.PersonaDetail(**v) for v in versions]

    @post("/{persona_id:uuid}/versions/{version:int}/restore", status_code=HTTP_200_OK)
    async def restore_persona_version(
        self, services: Services, user_id: UUID, persona_id: UUID, version: int
    ) -> schemas.PersonaDetail:
        """An earlier version's fields saved as a new version (none when they are the
        current ones already); the persona as it now stands."""
        await services.call(services.app.visible_persona, persona_id, user_id)  # 404 before 403
        await services.call(services.app.restore_persona_version, persona_id, user_id, version)
        return schemas.PersonaDetail(**await services.call(services.app.visible_persona, persona_id, user_id))
