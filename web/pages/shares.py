"""A shared chat, read-only and public."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from litestar import Controller, Request, get
from litestar.exceptions import NotFoundException
from litestar.response import Template

from api.services import Services
from web.pages.common import (
    render,
)


class SharePages(Controller):
    path = "/s"
    include_in_schema = False

    @get("/{share_id:uuid}")
    async def show_share(self, request: Request[Any, Any, Any], services: Services, share_id: UUID) -> Template:
        """A shared chat, read-only and public: the active branch as it was when shared."""
        share = await services.call(services.readmodels.share, share_id)
        if share is None:
            raise NotFoundException("no such share (it may have been revoked)")
        return await render(request, services, "share.html", share=dict(share))

