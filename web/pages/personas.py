"""Persona pages: the list, the form (new and edit, with its versions to view and restore),
retiring."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from litestar import Controller, Request, Response, get, post
from litestar.exceptions import NotFoundException
from litestar.response import Redirect, Template

from api.services import Services
from domain.persona import EDITABLE, PersonaError
from web import queries
from web.pages.common import (
    FormError,
    redirect,
    render,
    sidebar,
    text_field,
)


def persona_fields(form: Any) -> dict[str, Any]:
    """The persona form as the application's fields; numbers parsed with clear errors."""
    fields: dict[str, Any] = {
        "name": text_field(form, "name", 80, required=True),
        "avatar": text_field(form, "avatar", 500),
        "description": text_field(form, "description", 300),
        "system_prompt": text_field(form, "system_prompt", 4000, required=True),
        "greeting": text_field(form, "greeting", 500),
        "starters": [s.strip() for s in str(form.get("starters", "")).splitlines() if s.strip()],
        "visibility": text_field(form, "visibility", 10) or "private",
    }
    for name, kind in (("temperature", float), ("top_p", float), ("max_tokens", int)):
        raw = text_field(form, name, 20, required=True)
        try:
            fields[name] = kind(raw)
        except ValueError:
            raise FormError(f"{name.replace('_', ' ')} is a number") from None
    return fields


class PersonaPages(Controller):
    path = "/personas"
    include_in_schema = False

    @get("/")
    async def list_personas(self, request: Request[Any, Any, Any], services: Services, user_id: UUID) -> Template:
        return await render(request, services, "personas.html", personas=await queries.personas(services, user_id),
                            **await sidebar(services, user_id))

    @get("/new")
    async def new_persona(self, request: Request[Any, Any, Any], services: Services, user_id: UUID) -> Template:
        draft = {"temperature": 0.8, "top_p": 0.95, "max_tokens": 96, "visibility": "private", "starters": []}
        return await render(request, services, "persona_form.html", persona=draft, editing=False,
                            **await sidebar(services, user_id))

    @post("/")
    async def create_persona(self, request: Request[Any, Any, Any], services: Services, user_id: UUID) -> Response[Any]:
        form = await request.form()
        draft = {k: form.get(k, "") for k in (*EDITABLE, "slug")}
        draft["starters"] = str(form.get("starters", "")).splitlines()
        try:
            fields = {**persona_fields(form), "slug": text_field(form, "slug", 48, required=True)}
            persona_id = await services.call(services.app.create_persona, user_id, fields)
        except (PersonaError, FormError) as e:
            return await render(request, services, "persona_form.html", status=400, persona=draft, editing=False,
                                error=str(e).capitalize(), **await sidebar(services, user_id))
        await queries.settle(services, persona_id)
        return redirect(services, f"/personas/{persona_id}/edit", f"Created {fields['name']}.")

    @get("/{persona_id:uuid}/edit")
    async def edit_persona(
        self, request: Request[Any, Any, Any], services: Services, user_id: UUID, persona_id: UUID
    ) -> Template:
        persona = await services.call(services.app.visible_persona, persona_id, user_id)
        if persona["owner_id"] != user_id:
            raise NotFoundException("only the persona's creator can edit it")
        versions = await services.call(services.app.persona_versions, persona_id, user_id)
        return await render(request, services, "persona_form.html", persona=persona, editing=True,
                            versions=versions[::-1], **await sidebar(services, user_id))

    @post("/{persona_id:uuid}")
    async def update_persona(
        self, request: Request[Any, Any, Any], services: Services, user_id: UUID, persona_id: UUID
    ) -> Response[Any]:
        current = await services.call(services.app.visible_persona, persona_id, user_id)
        form = await request.form()
        try:
            fields = persona_fields(form)
            changes = {k: v for k, v in fields.items() if current.get(k) != v}  # each edit is a version
            if changes:
                await services.call(services.app.edit_persona, persona_id, user_id, changes)
        except (PersonaError, FormError) as e:
            draft = {**current, **{k: form.get(k, "") for k in EDITABLE}}
            draft["starters"] = str(form.get("starters", "")).splitlines()
            versions = await services.call(services.app.persona_versions, persona_id, user_id)
            return await render(request, services, "persona_form.html", status=400, persona=draft, editing=True,
                                versions=versions[::-1], error=str(e).capitalize(), **await sidebar(services, user_id))
        await queries.settle(services, persona_id)
        note = "Saved a new version." if changes else "Nothing changed."
        return redirect(services, f"/personas/{persona_id}/edit", note)

    @post("/{persona_id:uuid}/versions/{version:int}/restore")
    async def restore_version(
        self, services: Services, user_id: UUID, persona_id: UUID, version: int
    ) -> Redirect:
        """Make an earlier version current again: a new version with its fields (the form's
        versions list shows each one's fields); nothing is deleted."""
        persona = await services.call(services.app.visible_persona, persona_id, user_id)
        if persona["owner_id"] != user_id:
            raise NotFoundException("only the persona's creator can restore its versions")
        restored = await services.call(services.app.restore_persona_version, persona_id, user_id, version)
        if restored is None:
            return redirect(services, f"/personas/{persona_id}/edit",
                            f"The persona is as v{version} was already: nothing changed.")
        await queries.settle(services, persona_id)
        return redirect(services, f"/personas/{persona_id}/edit", f"Restored v{version} as v{restored}.")

    @post("/{persona_id:uuid}/retire")
    async def retire_persona(self, services: Services, user_id: UUID, persona_id: UUID) -> Redirect:
        await services.call(services.app.retire_persona, persona_id, user_id)
        await queries.settle(services, persona_id)
        return redirect(services, "/personas", "Persona retired.")

