"""`/api/shares/{id}`: a shared snapshot of a conversation, public and read-only."""

from __future__ import annotations

from uuid import UUID

from litestar import Controller, get
from litestar.exceptions import NotFoundException

from api import schemas
from api.services import Services


class ShareController(Controller):
    path = "/api/shares"

    @get("/{share_id:uuid}")
    async def get_share(self, services: Services, share_id: UUID) -> schemas.Share:
        """A shared snapshot: public, read-only; 404 once revoked."""
        row = await services.call(services.readmodels.share, share_id)
        if row is None:
            raise NotFoundException("no such share (it may have been revoked)")
        return schemas.Share(**row)
