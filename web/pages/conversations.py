"""The chat list and the chat: a new chat, messages, edits, branches, feedback, the
chat's own actions (rename, archive, delete, share) and import."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from litestar import Controller, Request, get, post
from litestar.datastructures import UploadFile
from litestar.response import Redirect, Template

from api.services import Services
from api.transfer import MAX_IMPORT_BYTES
from domain.conversation_errors import ConversationNotFound
from web import queries
from web.chat_list import VIEWS
from web.pages.common import (
    FormError,
    over_limit,
    redirect,
    render,
    safe_next,
    sidebar,
    text_field,
    uuid_field,
)

# how long a temporary chat is kept (the start form's choices), in seconds
KEEP_CHOICES = {"1h": 3600, "1d": 86_400, "7d": 7 * 86_400, "30d": 30 * 86_400}


class ConversationPages(Controller):
    path = "/c"
    include_in_schema = False

    @get("/")
    async def list_conversations(
        self, request: Request[Any, Any, Any], services: Services, user_id: UUID, q: str = "", archived: bool = False,
        view: str = "", before: datetime | None = None, before_id: UUID | None = None,
    ) -> Template:
        """The new-chat page; the chat list beside it may be a later page (`before`,
        `before_id`: the cursor of web/chat_list.py) or the chats made with API keys (`view=api`)."""
        q = q.strip()[:200]
        if view not in VIEWS:
            raise FormError("that list does not exist: view is empty or api")
        if (before is None) != (before_id is None):
            raise FormError("a page of the chat list needs both before and before_id")
        personas = await queries.personas(services, user_id)
        return await render(request, services, "conversations.html", personas=personas,
                            max_chars=services.app.max_message_chars, client_message_id=str(uuid4()),
                            **await sidebar(services, user_id, q, archived, view=view, before=before,
                                            before_id=before_id))

    @post("/")
    async def start_conversation(self, request: Request[Any, Any, Any], services: Services, user_id: UUID) -> Redirect:
        """A new chat, made by its first message `text` (the reply is requested at once), or
        empty without one. A message that cannot be sent leaves no chat behind."""
        form = await request.form()
        persona_id = uuid_field(form, "persona_id") if form.get("persona_id") else None
        keep = str(form.get("keep", ""))
        if keep and keep not in KEEP_CHOICES:
            raise FormError("choose how long to keep the chat from the list")
        keep_for = timedelta(seconds=KEEP_CHOICES[keep]) if keep else None
        text = text_field(form, "text", services.app.max_message_chars, label="your message")
        if text and (limited := await services.call(services.limits.check_send, user_id)) is not None:
            return redirect(services, "/c", limited.message.capitalize(), kind="error")
        conversation_id = await services.call(services.app.start_conversation, user_id, persona_id, keep_for)
        if text:
            client_message_id = text_field(form, "client_message_id", 100) or str(uuid4())
            try:
                await services.call(services.app.post_message, conversation_id, user_id, client_message_id, text)
            except Exception:
                await services.call(services.app.delete_conversation, conversation_id, user_id)
                await queries.settle(services, conversation_id)  # gone from the list the error page shows
                raise
        await queries.settle(services, conversation_id)
        return redirect(services, f"/c/{conversation_id}")

    @get("/{conversation_id:uuid}")
    async def show_conversation(
        self, request: Request[Any, Any, Any], services: Services, user_id: UUID, conversation_id: UUID, settle: bool = False
    ) -> Template:
        """The chat. `settle`: first wait until the read models hold every event of the
        conversation (the script asks so after a reply ends, to show it rendered)."""
        if settle:
            await queries.settle(services, conversation_id)
        return await render(request, services, "chat.html", **await chat_context(services, conversation_id, user_id))

    @post("/{conversation_id:uuid}/messages")
    async def post_message(
        self, request: Request[Any, Any, Any], services: Services, user_id: UUID, conversation_id: UUID
    ) -> Redirect:
        """Send without the script: the reply is requested; the chat page shows it pending."""
        form = await request.form()
        text = text_field(form, "text", services.app.max_message_chars, required=True, label="your message")
        client_message_id = text_field(form, "client_message_id", 100) or str(uuid4())
        if (refused := await over_limit(services, user_id, conversation_id)) is not None:
            return refused
        await services.call(services.app.post_message, conversation_id, user_id, client_message_id, text)
        await queries.settle(services, conversation_id)
        return redirect(services, f"/c/{conversation_id}#composer")

    @post("/{conversation_id:uuid}/messages/{message_id:uuid}/edit")
    async def edit_message(
        self, request: Request[Any, Any, Any], services: Services, user_id: UUID,
        conversation_id: UUID, message_id: UUID,
    ) -> Redirect:
        form = await request.form()
        text = text_field(form, "text", services.app.max_message_chars, required=True, label="your message")
        client_message_id = text_field(form, "client_message_id", 100) or str(uuid4())
        if (refused := await over_limit(services, user_id, conversation_id)) is not None:
            return refused
        posted = await services.call(
            services.app.edit_message, conversation_id, user_id, message_id, client_message_id, text
        )
        await queries.settle(services, conversation_id)
        return redirect(services, f"/c/{conversation_id}#m-{posted.message_id}")

    @post("/{conversation_id:uuid}/messages/{message_id:uuid}/regenerate")
    async def regenerate(
        self, services: Services, user_id: UUID, conversation_id: UUID, message_id: UUID
    ) -> Redirect:
        if (refused := await over_limit(services, user_id, conversation_id)) is not None:
            return refused
        posted = await services.call(services.app.regenerate, conversation_id, user_id, message_id)
        await queries.settle(services, conversation_id)
        return redirect(services, f"/c/{conversation_id}#m-{posted.reply_id}")

    @post("/{conversation_id:uuid}/messages/{message_id:uuid}/feedback")
    async def give_feedback(
        self, request: Request[Any, Any, Any], services: Services, user_id: UUID,
        conversation_id: UUID, message_id: UUID,
    ) -> Redirect:
        """A thumb (its `rating`; "none", the thumb pressed already, takes the rating back),
        or the comment form (`rating` and `comment`; an empty comment removes it). A thumb
        keeps the comment given before."""
        form = await request.form()
        rating = text_field(form, "rating", 10)
        if rating not in ("up", "down", "none"):
            raise FormError("rating is up, down or none")
        if rating == "none":
            await services.call(services.app.clear_feedback, conversation_id, user_id, message_id)
            done = "Rating removed."
        else:
            comment = text_field(form, "comment", 1000) if "comment" in form else None
            await services.call(services.app.give_feedback, conversation_id, user_id, message_id, rating, comment)
            done = "Thanks for the feedback."
        await queries.settle(services, conversation_id)
        return redirect(services, f"/c/{conversation_id}#m-{message_id}", done)

    @post("/{conversation_id:uuid}/branch")
    async def select_branch(
        self, request: Request[Any, Any, Any], services: Services, user_id: UUID, conversation_id: UUID
    ) -> Redirect:
        form = await request.form()
        message_id = uuid_field(form, "message_id")
        await services.call(services.app.select_branch, conversation_id, user_id, message_id)
        await queries.settle(services, conversation_id)
        return redirect(services, f"/c/{conversation_id}#m-{message_id}")

    @post("/{conversation_id:uuid}/rename")
    async def rename(
        self, request: Request[Any, Any, Any], services: Services, user_id: UUID, conversation_id: UUID
    ) -> Redirect:
        form = await request.form()
        title = text_field(form, "title", 200, required=True)
        await services.call(services.app.update_conversation, conversation_id, user_id, title=title)
        await queries.settle(services, conversation_id)
        return redirect(services, back(form, conversation_id), "Renamed.")

    @post("/{conversation_id:uuid}/pin")
    async def pin(
        self, request: Request[Any, Any, Any], services: Services, user_id: UUID, conversation_id: UUID
    ) -> Redirect:
        """Pin the chat to the top of the list (`pinned` 1), or unpin it (0)."""
        form = await request.form()
        pinned = form.get("pinned", "1") != "0"
        await services.call(services.app.update_conversation, conversation_id, user_id, pinned=pinned)
        await queries.settle(services, conversation_id)
        return redirect(services, back(form, conversation_id), "Pinned." if pinned else "Unpinned.")

    @post("/{conversation_id:uuid}/archive")
    async def archive(
        self, request: Request[Any, Any, Any], services: Services, user_id: UUID, conversation_id: UUID
    ) -> Redirect:
        form = await request.form()
        archived = form.get("archived", "1") != "0"
        await services.call(services.app.update_conversation, conversation_id, user_id, archived=archived)
        await queries.settle(services, conversation_id)
        return redirect(services, back(form, conversation_id), "Archived." if archived else "Back from the archive.")

    @post("/{conversation_id:uuid}/delete")
    async def delete(
        self, request: Request[Any, Any, Any], services: Services, user_id: UUID, conversation_id: UUID
    ) -> Redirect:
        form = await request.form()
        await services.call(services.app.delete_conversation, conversation_id, user_id)
        await queries.settle(services, conversation_id)
        gone = back(form, conversation_id, default="/c")
        return redirect(services, "/c" if gone.startswith(f"/c/{conversation_id}") else gone, "Conversation deleted.")


    @post("/{conversation_id:uuid}/shares")
    async def share(
        self, request: Request[Any, Any, Any], services: Services, user_id: UUID, conversation_id: UUID
    ) -> Redirect:
        """A read-only snapshot of the active branch as it is now, at /s/{share_id}."""
        form = await request.form()
        share_id = await services.call(services.app.share_conversation, conversation_id, user_id)
        await queries.settle(services, conversation_id)
        link = f"{request.base_url}".rstrip("/") + f"/s/{share_id}"
        return redirect(services, back(form, conversation_id), f"Anyone with this link can read the chat: {link}")

    @post("/{conversation_id:uuid}/shares/{share_id:uuid}/delete")
    async def stop_sharing(
        self, services: Services, user_id: UUID, conversation_id: UUID, share_id: UUID
    ) -> Redirect:
        await services.call(services.app.revoke_share, conversation_id, user_id, share_id)
        await queries.settle(services, conversation_id)
        return redirect(services, f"/c/{conversation_id}", "That link no longer works.")

    @post("/import", request_max_body_size=MAX_IMPORT_BYTES)
    async def import_conversations(
        self, request: Request[Any, Any, Any], services: Services, user_id: UUID
    ) -> Redirect:
        """An uploaded export, ChatGPT's `conversations.json` or this app's own: each readable
        conversation becomes one here, except those imported before."""
        form = await request.form()
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise FormError("choose the conversations.json file of a ChatGPT export, or a file this app exported")
        try:
            data = json.loads(await upload.read())
        except (ValueError, UnicodeDecodeError):
            raise FormError("that file is not JSON: choose the conversations.json of a ChatGPT export,"
                            " or a file this app exported") from None
        except RecursionError:
            raise FormError("that file is not an export: its JSON nests too deeply") from None
        result = await services.call(services.app.import_conversations, user_id, data)
        if not result["imported"] and not result["duplicates"]:  # JSON, but no export: nothing was saved
            raise FormError("nothing in that file could be imported: choose the conversations.json of a ChatGPT "
                            "export, or a file this app exported")
        for conversation_id in result["conversation_ids"]:
            await queries.settle(services, conversation_id)
        return redirect(services, "/c", import_note(result))


def back(form: Any, conversation_id: UUID, default: str | None = None) -> str:
    """Where a chat's action returns: the page its form was on (`next`: the chat list's
    menu is on every page), else the chat."""
    return safe_next(form.get("next"), default or f"/c/{conversation_id}")


def import_note(result: dict[str, Any]) -> str:
    """What an import did, in words: imported, left out as imported before, unreadable."""
    def chats(n: int) -> str:
        return f"{n} conversation{'s' if n != 1 else ''}"

    note = f"Imported {chats(result['imported'])}."
    if result["duplicates"]:
        note += f" Left out {chats(result['duplicates'])} imported before."
    unreadable = [s for s in result["skipped"] if not s.get("duplicate")]
    if unreadable:
        note += f" Skipped {len(unreadable)} that could not be imported: {unreadable[0]['reason']}."
    return note


async def chat_context(services: Services, conversation_id: UUID, user_id: UUID) -> dict[str, Any]:
    try:
        conversation = await queries.conversation(services, conversation_id, user_id)
    except ConversationNotFound:
        await queries.settle(services, conversation_id)  # created a moment ago elsewhere (the API)?
        conversation = await queries.conversation(services, conversation_id, user_id)
    messages = await queries.thread(services, conversation_id)
    persona = await queries.persona(services, conversation["persona_id"], user_id)
    return {
        "conversation": conversation, "messages": messages, "persona": persona,
        "shares": await queries.shares(services, conversation_id),
        "pending": next((m for m in messages if m["status"] == "pending"), None),
        "client_message_id": str(uuid4()),
        "max_chars": services.app.max_message_chars,
        **await sidebar(services, user_id, current=conversation_id),
    }

