"""Shared chats: a shared snapshot, read-only and public, and the list of a user's own
share links across their chats (copy one, stop sharing one)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from litestar import Controller, Request, get, post
from litestar.exceptions import NotFoundException
from litestar.response import Redirect, Template

from api.services import Services
from web import queries
from web.pages.common import (
    redirect,
    render,
    sidebar,
)


class SharePages(Controller):
    path = "/"
    include_in_schema = False

    @get("/s/{share_id:uuid}")
    async def show_share(self, request: Request[Any, Any, Any], services: Services, share_id: UUID) -> Template:
        """A shared chat, read-only and public: the active branch as it was when shared."""
        share = await services.call(services.readmodels.share, share_id)
        if share is None:
            raise NotFoundException("no such share (it may have been revoked)")
        return await render(request, services, "share.html", share=dict(share))

    @get("/shares")
    async def list_shares(self, request: Request[Any, Any, Any], services: Services, user_id: UUID) -> Template:
        """Every link the viewer shares, newest first: what is readable by whoever has it."""
        return await render(request, services, "shares.html", shares=await queries.user_shares(services, user_id),
                            **await sidebar(services, user_id))

    @post("/shares/{share_id:uuid}/delete")
    async def stop_sharing(self, services: Services, user_id: UUID, share_id: UUID) -> Redirect:
        """Stop one of the viewer's links from the list (the chat's menu has its own form)."""
        share = next((s for s in await queries.user_shares(services, user_id) if s["id"] == share_id), None)
        if share is None:
            raise NotFoundException("no such share link of yours (it may have been stopped already)")
        await services.call(services.app.revoke_share, share["conversation_id"], user_id, share_id)
        await queries.settle(services, share["conversation_id"])
        return redirect(services, "/shares", "That link no longer works.")
