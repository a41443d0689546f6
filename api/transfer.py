"""`/api/export` and `/api/import`: every conversation of the user as JSON, and ChatGPT's
`conversations.json` imported."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.exceptions import ValidationException
from litestar.status_codes import HTTP_201_CREATED

from api import schemas
from api.services import Services

MAX_IMPORT_BYTES = 64 * 1024 * 1024  # a ChatGPT export of a heavy user


class TransferController(Controller):
    path = "/api"

    @get("/export")
    async def export_all(self, services: Services, user_id: UUID) -> Response[Any]:
        """Every conversation of the user (archived ones too), every branch, as JSON."""

        def export() -> list[dict[str, Any]]:
            ids = [r["id"] for archived in (False, True)
                   for r in services.readmodels.conversations(user_id, 100_000, archived=archived)]
            return [services.app.export_conversation(cid, user_id) for cid in ids]

        conversations = await services.call(export)
        return Response(
            {"format": "chatbot.export.v1", "conversations": conversations},
            headers={"Content-Disposition": 'attachment; filename="conversations.json"'},
        )

    @post("/import", status_code=HTTP_201_CREATED, request_max_body_size=MAX_IMPORT_BYTES)
    async def import_chatgpt(
        self, request: Request[Any, Any, Any], services: Services, user_id: UUID
    ) -> schemas.ImportResult:
        """Import ChatGPT's `conversations.json` (the body, as is). Conversations that cannot
        be read are listed under `skipped` with the reason; the rest are imported."""
        try:
            data = msgspec.json.decode(await request.body())
        except msgspec.DecodeError as e:
            raise ValidationException(f"the body is not JSON: {e}") from None
        result = await services.call(services.app.import_conversations, user_id, data)
        return schemas.ImportResult(**{**result, "skipped": [schemas.ImportSkipped(**s) for s in result["skipped"]]})
