"""Page controllers: the server-rendered web UI, one controller per resource.

Pages read through the services the API uses and render Jinja templates; every form posts
to a page route, which runs the command, waits for the read models to catch up and
redirects (POST-redirect-GET) with a one-shot flash message. Forms carry a CSRF token
(`web.csrf`); the session is the API's cookie (`api.auth`). The one script,
`static/chat.js`, streams replies over the websocket and enhances the chat forms; without
it every form still works, replies simply appear on reload.

Routes: /login, /register, /logout; /c (conversations and a new one), /c/{id} (the chat)
and its actions (/c/{id}/messages, .../edit, .../regenerate, .../feedback, /branch, /rename,
/archive, /delete, /shares), /c/import; /personas, /personas/new, /personas/{id}/edit;
/s/{share_id} (a shared snapshot, public)."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

from jinja2 import Environment
from litestar import Controller, MediaType, Request, Response, Router, get, post
from litestar.datastructures import CacheControlHeader, Cookie, ResponseHeader, UploadFile
from litestar.exceptions import HTTPException, NotAuthorizedException, NotFoundException
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig

from api.auth import COOKIE as SESSION_COOKIE
from api.auth import issue_token, session_of, user_of
from api.routes import MAX_IMPORT_BYTES, checked_log_in, client_address, refuse_if
from api.services import Services
from api.throttle import TooManyAttempts
from chatbot.config import Settings
from domain.conversation import ConversationError, ConversationNotFound
from domain.persona import EDITABLE, PersonaError, PersonaNotFound
from domain.user import InvalidCredentials, UserError
from web import queries
from web.csrf import CSRF_COOKIE, CSRF_FIELD, CsrfFailed, csrf_guard, form_token, new_seed, seed_cookie
from web.rendering import render_markdown

HERE = Path(__file__).parent
TEMPLATES, STATIC = HERE / "templates", HERE / "static"
FLASH_COOKIE = "flash"

# No inline script or style, no plugins, no framing, no foreign hosts: even markup that
# slipped past the sanitiser could not run a script or load anything.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    ResponseHeader(name="Content-Security-Policy", value=CSP),
    ResponseHeader(name="X-Content-Type-Options", value="nosniff"),
    ResponseHeader(name="Referrer-Policy", value="same-origin"),
    ResponseHeader(name="X-Frame-Options", value="DENY"),
]


class LoginRequired(Exception):
    """A page that needs a session was asked for without one: off to /login."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


# -- helpers -------------------------------------------------------------------------------


def safe_next(value: str | None, default: str = "/c") -> str:
    """Only a local path: `//host` or `/\\host` would leave the site."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")):
        return default
    return value


def viewer(request: Request[Any, Any, Any], services: Services) -> UUID | None:
    return user_of(request, services.settings.secret_key)


def require_viewer(request: Request[Any, Any, Any], services: Services) -> UUID:
    user_id = viewer(request, services)
    if user_id is None:
        query = f"?{request.scope['query_string'].decode()}" if request.scope.get("query_string") else ""
        raise LoginRequired(request.url.path + query if request.method == "GET" else "/c")
    return user_id


def encode_flash(kind: str, text: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"kind": kind, "text": text[:500]}).encode()).decode()


def decode_flash(value: str | None) -> dict[str, str] | None:
    if not value:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(value.encode()))
        return {"kind": str(data["kind"]), "text": str(data["text"])}
    except (ValueError, KeyError, TypeError):
        return None


def flash_cookie(kind: str, text: str, secure: bool) -> Cookie:
    return Cookie(key=FLASH_COOKIE, value=encode_flash(kind, text), httponly=True, samesite="lax",
                  secure=secure, path="/", max_age=60)


def redirect(services: Services, path: str, flash: str | None = None, kind: str = "notice",
             cookies: list[Cookie] | None = None) -> Redirect:
    """303 See Other: the browser GETs the next page, so a reload never re-posts."""
    cookies = list(cookies or [])
    if flash:
        cookies.append(flash_cookie(kind, flash, services.settings.cookie_secure))
    return Redirect(path, status_code=303, cookies=cookies)


async def new_session_token(request: Request[Any, Any, Any], services: Services, user_id: UUID) -> str:
    """A log-in's token, for a session recorded so that it can be ended (api/sessions.py)."""
    session_id = await services.call(services.sessions.start, user_id, request.headers.get("user-agent", ""))
    return issue_token(services.settings.secret_key, user_id, services.settings.token_ttl_s, session_id)


def session_cookie(settings: Settings, token: str) -> Cookie:
    return Cookie(key=SESSION_COOKIE, value=token, httponly=True, samesite="lax", secure=settings.cookie_secure,
                  max_age=settings.token_ttl_s, path="/")


async def render(
    request: Request[Any, Any, Any], services: Services, template: str, status: int = 200, **context: Any
) -> Template:
    """A page: the template with the CSRF token, the flash message and the viewer."""
    settings = services.settings
    cookies: list[Cookie] = []
    seed = request.cookies.get(CSRF_COOKIE)
    if not seed:
        seed = new_seed()
        cookies.append(seed_cookie(seed, settings.cookie_secure))
    flash = decode_flash(request.cookies.get(FLASH_COOKIE))
    if request.cookies.get(FLASH_COOKIE) is not None:
        cookies.append(Cookie(key=FLASH_COOKIE, value="", max_age=0, path="/"))
    user_id = viewer(request, services)
    email = None
    if user_id is not None:
        try:
            email = await services.call(services.app.user_email, user_id)
        except InvalidCredentials:
            user_id = None
    context = {
        "csrf_field": CSRF_FIELD,
        "csrf_token": form_token(settings.secret_key, seed, request.cookies.get(SESSION_COOKIE, "")),
        "flash": flash, "viewer_id": user_id, "viewer_email": email, "path": request.url.path,
        **context,
    }
    return Template(template_name=template, context=context, status_code=status, cookies=cookies)


def text_field(form: Any, name: str, max_length: int, required: bool = False) -> str:
    """A form field as stripped text, with a clear error when it is missing or too long."""
    value = form.get(name)
    value = value.strip() if isinstance(value, str) else ""
    if required and not value:
        raise FormError(f"{name.replace('_', ' ')} is required")
    if len(value) > max_length:
        raise FormError(f"{name.replace('_', ' ')} has at most {max_length} characters")
    return value


def uuid_field(form: Any, name: str) -> UUID:
    try:
        return UUID(str(form.get(name, "")))
    except ValueError:
        raise FormError(f"{name.replace('_', ' ')} is not a valid id") from None


class FormError(ValueError):
    """A form field that cannot be used as sent; the message names it."""


# -- auth ------------------------------------------------------------------------------------


# how long a temporary chat is kept (the start form's choices), in seconds
KEEP_CHOICES = {"1h": 3600, "1d": 86_400, "7d": 7 * 86_400, "30d": 30 * 86_400}


class AuthPages(Controller):
    path = "/"
    include_in_schema = False

    @get("/")
    async def show_home(self, request: Request[Any, Any, Any], services: Services) -> Redirect:
        return Redirect("/c" if viewer(request, services) else "/login", status_code=303)

    @get("/login")
    async def show_login(self, request: Request[Any, Any, Any], services: Services, next: str = "/c") -> Template:
        return await render(request, services, "login.html", mode="login", next=safe_next(next))

    @post("/login")
    async def log_in(self, request: Request[Any, Any, Any], services: Services) -> Response[Any]:
        form = await request.form()
        email, password = text_field(form, "email", 254), str(form.get("password", ""))
        next_path = safe_next(form.get("next"))
        try:
            user_id = await services.call(checked_log_in, services, client_address(request, services.settings),
                                          email, password)
        except InvalidCredentials:
            return await render(request, services, "login.html", status=401, mode="login", next=next_path,
                                email=email, error="Wrong e-mail address or password.")
        except TooManyAttempts as e:
            return await render(request, services, "login.html", status=429, mode="login", next=next_path,
                                email=email, error=f"{str(e).capitalize()}.")
        token = await new_session_token(request, services, user_id)
        return redirect(services, next_path, cookies=[session_cookie(services.settings, token)])

    @get("/register")
    async def show_register(self, request: Request[Any, Any, Any], services: Services) -> Template:
        return await render(request, services, "login.html", mode="register", next="/c")

    @post("/register")
    async def register(self, request: Request[Any, Any, Any], services: Services) -> Response[Any]:
        form = await request.form()
        email, password = text_field(form, "email", 254), str(form.get("password", ""))
        try:
            if password != form.get("password_again", password):
                raise FormError("the two passwords differ")
            refuse_if(await services.call(services.throttle.attempt, client_address(request, services.settings)))
            user_id = await services.call(services.app.register_user, email, password)
        except TooManyAttempts as e:
            return await render(request, services, "login.html", status=429, mode="register", next="/c",
                                email=email, error=f"{str(e).capitalize()}.")
        except (UserError, FormError) as e:
            status = 409 if "already registered" in str(e) else 400
            return await render(request, services, "login.html", status=status, mode="register", next="/c",
                                email=email, error=str(e).capitalize())
        token = await new_session_token(request, services, user_id)
        return redirect(services, "/c", "Welcome! Pick a persona and start a chat.",
                        cookies=[session_cookie(services.settings, token)])

    @post("/logout")
    async def log_out(self, request: Request[Any, Any, Any], services: Services) -> Redirect:
        session = session_of(request, services.settings.secret_key)
        if session is not None:  # the cookie stops working everywhere, not just here
            await services.call(services.sessions.end, session.user_id, session.session_id)
        gone = Cookie(key=SESSION_COOKIE, value="", max_age=0, path="/")
        return redirect(services, "/login", "You are logged out.", cookies=[gone])


# -- conversations -----------------------------------------------------------------------------


async def sidebar(services: Services, user_id: UUID, q: str = "", archived: bool = False) -> dict[str, Any]:
    return {
        "conversations": await queries.conversations(services, user_id, q=q, archived=archived),
        "q": q, "archived": archived,
    }


async def over_limit(services: Services, user_id: UUID, conversation_id: UUID) -> Redirect | None:
    """Every form that requests a reply (send, edit, regenerate) counts against the user's
    rate, as its websocket frame does; over it, back to the chat with the reason."""
    limited = await services.call(services.limits.check_send, user_id)
    if limited is None:
        return None
    return redirect(services, f"/c/{conversation_id}", limited.message.capitalize(), kind="error")


class ConversationPages(Controller):
    path = "/c"
    include_in_schema = False

    @get("/")
    async def list_conversations(
        self, request: Request[Any, Any, Any], services: Services, q: str = "", archived: bool = False
    ) -> Template:
        user_id = require_viewer(request, services)
        q = q.strip()[:200]
        personas = await queries.personas(services, user_id)
        return await render(request, services, "conversations.html", personas=personas,
                            max_chars=services.app.max_message_chars, client_message_id=str(uuid4()),
                            **await sidebar(services, user_id, q, archived))

    @post("/")
    async def start_conversation(self, request: Request[Any, Any, Any], services: Services) -> Redirect:
        """A new chat, made by its first message `text` (the reply is requested at once), or
        empty without one. A message that cannot be sent leaves no chat behind."""
        user_id = require_viewer(request, services)
        form = await request.form()
        persona_id = uuid_field(form, "persona_id") if form.get("persona_id") else None
        keep = str(form.get("keep", ""))
        if keep and keep not in KEEP_CHOICES:
            raise FormError("choose how long to keep the chat from the list")
        keep_for = timedelta(seconds=KEEP_CHOICES[keep]) if keep else None
        text = text_field(form, "text", services.app.max_message_chars)
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
        self, request: Request[Any, Any, Any], services: Services, conversation_id: UUID, settle: bool = False
    ) -> Template:
        """The chat. `settle`: first wait until the read models hold every event of the
        conversation (the script asks so after a reply ends, to show it rendered)."""
        user_id = require_viewer(request, services)
        if settle:
            await queries.settle(services, conversation_id)
        return await render(request, services, "chat.html", **await chat_context(services, conversation_id, user_id))

    @post("/{conversation_id:uuid}/messages")
    async def post_message(self, request: Request[Any, Any, Any], services: Services, conversation_id: UUID) -> Redirect:
        """Send without the script: the reply is requested; the chat page shows it pending."""
        user_id = require_viewer(request, services)
        form = await request.form()
        text = text_field(form, "text", services.app.max_message_chars, required=True)
        client_message_id = text_field(form, "client_message_id", 100) or str(uuid4())
        if (refused := await over_limit(services, user_id, conversation_id)) is not None:
            return refused
        await services.call(services.app.post_message, conversation_id, user_id, client_message_id, text)
        await queries.settle(services, conversation_id)
        return redirect(services, f"/c/{conversation_id}#composer")

    @post("/{conversation_id:uuid}/messages/{message_id:uuid}/edit")
    async def edit_message(
        self, request: Request[Any, Any, Any], services: Services, conversation_id: UUID, message_id: UUID
    ) -> Redirect:
        user_id = require_viewer(request, services)
        form = await request.form()
        text = text_field(form, "text", services.app.max_message_chars, required=True)
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
        self, request: Request[Any, Any, Any], services: Services, conversation_id: UUID, message_id: UUID
    ) -> Redirect:
        user_id = require_viewer(request, services)
        if (refused := await over_limit(services, user_id, conversation_id)) is not None:
            return refused
        posted = await services.call(services.app.regenerate, conversation_id, user_id, message_id)
        await queries.settle(services, conversation_id)
        return redirect(services, f"/c/{conversation_id}#m-{posted.reply_id}")

    @post("/{conversation_id:uuid}/messages/{message_id:uuid}/feedback")
    async def give_feedback(
        self, request: Request[Any, Any, Any], services: Services, conversation_id: UUID, message_id: UUID
    ) -> Redirect:
        """A thumb (its `rating`; "none", the thumb pressed already, takes the rating back),
        or the comment form (`rating` and `comment`; an empty comment removes it). A thumb
        keeps the comment given before."""
        user_id = require_viewer(request, services)
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
    async def select_branch(self, request: Request[Any, Any, Any], services: Services, conversation_id: UUID) -> Redirect:
        user_id = require_viewer(request, services)
        form = await request.form()
        message_id = uuid_field(form, "message_id")
        await services.call(services.app.select_branch, conversation_id, user_id, message_id)
        await queries.settle(services, conversation_id)
        return redirect(services, f"/c/{conversation_id}#m-{message_id}")

    @post("/{conversation_id:uuid}/rename")
    async def rename(self, request: Request[Any, Any, Any], services: Services, conversation_id: UUID) -> Redirect:
        user_id = require_viewer(request, services)
        form = await request.form()
        title = text_field(form, "title", 200, required=True)
        await services.call(services.app.update_conversation, conversation_id, user_id, title=title)
        await queries.settle(services, conversation_id)
        return redirect(services, f"/c/{conversation_id}", "Renamed.")

    @post("/{conversation_id:uuid}/archive")
    async def archive(self, request: Request[Any, Any, Any], services: Services, conversation_id: UUID) -> Redirect:
        user_id = require_viewer(request, services)
        form = await request.form()
        archived = form.get("archived", "1") != "0"
        await services.call(services.app.update_conversation, conversation_id, user_id, archived=archived)
        await queries.settle(services, conversation_id)
        return redirect(services, f"/c/{conversation_id}", "Archived." if archived else "Back from the archive.")

    @post("/{conversation_id:uuid}/delete")
    async def delete(self, request: Request[Any, Any, Any], services: Services, conversation_id: UUID) -> Redirect:
        user_id = require_viewer(request, services)
        await services.call(services.app.delete_conversation, conversation_id, user_id)
        await queries.settle(services, conversation_id)
        return redirect(services, "/c", "Conversation deleted.")


    @post("/{conversation_id:uuid}/shares")
    async def share(self, request: Request[Any, Any, Any], services: Services, conversation_id: UUID) -> Redirect:
        """A read-only snapshot of the active branch as it is now, at /s/{share_id}."""
        user_id = require_viewer(request, services)
        share_id = await services.call(services.app.share_conversation, conversation_id, user_id)
        await queries.settle(services, conversation_id)
        link = f"{request.base_url}".rstrip("/") + f"/s/{share_id}"
        return redirect(services, f"/c/{conversation_id}", f"Anyone with this link can read the chat: {link}")

    @post("/{conversation_id:uuid}/shares/{share_id:uuid}/delete")
    async def stop_sharing(
        self, request: Request[Any, Any, Any], services: Services, conversation_id: UUID, share_id: UUID
    ) -> Redirect:
        user_id = require_viewer(request, services)
        await services.call(services.app.revoke_share, conversation_id, user_id, share_id)
        await queries.settle(services, conversation_id)
        return redirect(services, f"/c/{conversation_id}", "That link no longer works.")

    @post("/import", request_max_body_size=MAX_IMPORT_BYTES)
    async def import_conversations(self, request: Request[Any, Any, Any], services: Services) -> Redirect:
        """An uploaded export, ChatGPT's `conversations.json` or this app's own: each readable
        conversation becomes one here, except those imported before."""
        user_id = require_viewer(request, services)
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
        for conversation_id in result["conversation_ids"]:
            await queries.settle(services, conversation_id)
        return redirect(services, "/c", import_note(result))


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
        **await sidebar(services, user_id),
    }


# -- personas ------------------------------------------------------------------------------


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
    async def list_personas(self, request: Request[Any, Any, Any], services: Services) -> Template:
        user_id = require_viewer(request, services)
        return await render(request, services, "personas.html", personas=await queries.personas(services, user_id),
                            **await sidebar(services, user_id))

    @get("/new")
    async def new_persona(self, request: Request[Any, Any, Any], services: Services) -> Template:
        user_id = require_viewer(request, services)
        draft = {"temperature": 0.8, "top_p": 0.95, "max_tokens": 96, "visibility": "private", "starters": []}
        return await render(request, services, "persona_form.html", persona=draft, editing=False,
                            **await sidebar(services, user_id))

    @post("/")
    async def create_persona(self, request: Request[Any, Any, Any], services: Services) -> Response[Any]:
        user_id = require_viewer(request, services)
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
    async def edit_persona(self, request: Request[Any, Any, Any], services: Services, persona_id: UUID) -> Template:
        user_id = require_viewer(request, services)
        persona = await services.call(services.app.visible_persona, persona_id, user_id)
        if persona["owner_id"] != user_id:
            raise NotFoundException("only the persona's creator can edit it")
        versions = await services.call(services.app.persona_versions, persona_id, user_id)
        return await render(request, services, "persona_form.html", persona=persona, editing=True,
                            versions=versions[::-1], **await sidebar(services, user_id))

    @post("/{persona_id:uuid}")
    async def update_persona(self, request: Request[Any, Any, Any], services: Services, persona_id: UUID) -> Response[Any]:
        user_id = require_viewer(request, services)
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

    @post("/{persona_id:uuid}/retire")
    async def retire_persona(self, request: Request[Any, Any, Any], services: Services, persona_id: UUID) -> Redirect:
        user_id = require_viewer(request, services)
        await services.call(services.app.retire_persona, persona_id, user_id)
        await queries.settle(services, persona_id)
        return redirect(services, "/personas", "Persona retired.")


# -- shared snapshots ---------------------------------------------------------------------------


class AccountPages(Controller):
    """The account: consent to training use, and erasing the account with all its data."""

    path = "/account"
    include_in_schema = False

    @get("/")
    async def show_account(self, request: Request[Any, Any, Any], services: Services) -> Template:
        user_id = require_viewer(request, services)
        consent = await services.call(services.app.training_consent, user_id)
        current = session_of(request, services.settings.secret_key)
        sessions = await services.call(services.sessions.live, user_id)
        for s in sessions:
            s["current"] = current is not None and s["id"] == current.session_id
        return await render(request, services, "account.html", training_consent=consent, sessions=sessions,
                            **await sidebar(services, user_id))

    @post("/sessions/{session_id:uuid}/end")
    async def end_session(self, request: Request[Any, Any, Any], services: Services, session_id: UUID) -> Redirect:
        """End one of the viewer's sessions (say, a lost phone's): its cookie or token stops working."""
        user_id = require_viewer(request, services)
        ended = await services.call(services.sessions.end, user_id, session_id)
        return redirect(services, "/account", "That session is ended." if ended else "That session had ended already.")

    @post("/consent")
    async def set_consent(self, request: Request[Any, Any, Any], services: Services) -> Redirect:
        user_id = require_viewer(request, services)
        form = await request.form()
        training = form.get("training") == "on"
        await services.call(services.app.set_training_consent, user_id, training)
        note = "Your conversations may now help train the model." if training else \
            "Your conversations will not be used for training."
        return redirect(services, "/account", note)

    @post("/delete")
    async def delete_account(self, request: Request[Any, Any, Any], services: Services) -> Response[Any]:
        """Erase the account: its data key is destroyed, so every message it wrote becomes
        unreadable everywhere; the read models drop its rows."""
        user_id = require_viewer(request, services)
        form = await request.form()
        if form.get("confirm") != "erase":
            return redirect(services, "/account", "Tick the box to confirm that everything should be erased.", "error")
        try:
            await services.call(services.app.delete_account, user_id, str(form.get("password", "")))
        except InvalidCredentials:
            return redirect(services, "/account", "Wrong password: nothing was erased.", "error")
        await services.call(services.sessions.forget, user_id)
        gone = Cookie(key=SESSION_COOKIE, value="", max_age=0, path="/")
        return redirect(services, "/login", "Your account and all its conversations are erased.", cookies=[gone])


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


# -- errors as pages -------------------------------------------------------------------------


def error_page(request: Request[Any, Any, Any], status: int, title: str, message: str) -> Response[str]:
    engine = request.app.template_engine
    assert engine is not None, "the web pages need the template engine (web.pages.template_config)"
    html = engine.get_template("error.html").render(status=status, title=title, message=message)
    return Response(html, status_code=status, media_type=MediaType.HTML,
                    headers={h.name: str(h.value) for h in SECURITY_HEADERS})


def on_login_required(request: Request[Any, Any, Any], exc: LoginRequired) -> Response[Any]:
    from urllib.parse import quote

    return Redirect(f"/login?next={quote(exc.next_path, safe='/')}", status_code=303)


def on_not_authorized(request: Request[Any, Any, Any], _: Exception) -> Response[Any]:
    return Redirect("/login", status_code=303)


def on_csrf(request: Request[Any, Any, Any], exc: Exception) -> Response[str]:
    return error_page(request, 403, "Form expired", str(getattr(exc, "detail", exc)))


def on_not_found(request: Request[Any, Any, Any], _: Exception) -> Response[str]:
    return error_page(request, 404, "Not found", "There is nothing here, or it is not yours to see.")


def on_bad_form(request: Request[Any, Any, Any], exc: Exception) -> Response[str]:
    """A command the domain refused (or a form field it could not take): say why."""
    if isinstance(exc, (ConversationNotFound, PersonaNotFound)):
        return on_not_found(request, exc)
    message = str(exc) or type(exc).__name__
    return error_page(request, 400, "That did not work", message[:1].upper() + message[1:])


def on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[str]:
    if exc.status_code == 404:
        return on_not_found(request, exc)
    return error_page(request, exc.status_code, "Something went wrong", str(exc.detail))


# -- assembly --------------------------------------------------------------------------------


def static_version(directory: Path = STATIC) -> str:
    """A digest of the static files, appended to their URLs: a new deploy is a new URL."""
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def avatar_text(persona: Any) -> str:
    """What a persona's avatar pill shows: its avatar text (an emoji or a few letters,
    clipped by CSS), else the first letter of its name."""
    avatar = str(persona.get("avatar") or "").strip()
    return avatar[:16] if avatar else (str(persona.get("name") or "?").strip()[:1].upper() or "?")


def when(moment: datetime) -> str:
    """A time for people: "6 Dec 2026, 14:05 UTC"."""
    moment = moment.astimezone(timezone.utc)
    return f"{moment.day} {moment:%b %Y, %H:%M} UTC"


def configure_jinja(engine: JinjaTemplateEngine) -> None:
    env: Environment = engine.engine
    env.filters["markdown"] = render_markdown
    env.filters["avatar"] = avatar_text
    env.filters["when"] = when
    env.globals["static_version"] = static_version()
    env.trim_blocks = env.lstrip_blocks = True


template_config = TemplateConfig(directory=TEMPLATES, engine=JinjaTemplateEngine, engine_callback=configure_jinja)


def page_handlers(settings: Settings) -> list[Any]:
    """The page routes (CSRF-guarded, security headers, HTML errors) and the static files."""
    pages = Router(
        path="/",
        route_handlers=[AuthPages, ConversationPages, PersonaPages, AccountPages, SharePages],
        guards=[csrf_guard(settings.secret_key)],
        response_headers=SECURITY_HEADERS,
        include_in_schema=False,
        exception_handlers={
            LoginRequired: on_login_required,
            NotAuthorizedException: on_not_authorized,
            CsrfFailed: on_csrf,
            NotFoundException: on_not_found,
            FormError: on_bad_form,
            UserError: on_bad_form,
            ConversationError: on_bad_form,
            PersonaError: on_bad_form,
            HTTPException: on_http_error,
        },
    )
    # the pages link static files with a digest of their content (`?v=`): cache for long
    static = create_static_files_router(path="/static", directories=[STATIC], include_in_schema=False,
                                        cache_control=CacheControlHeader(max_age=86400, public=True))
    return [pages, static]
