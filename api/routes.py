"""REST resources: one controller per resource; handlers take what they need by name."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Annotated, Any
from uuid import UUID

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.datastructures import Cookie
from litestar.exceptions import NotFoundException, ValidationException
from litestar.params import Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_204_NO_CONTENT, HTTP_503_SERVICE_UNAVAILABLE

from api import schemas
from api.auth import COOKIE, issue_token, require_user, session_of, user_of
from api.limits import Limited
from api.services import Services
from api.throttle import TooManyAttempts
from domain.application import DEFAULT_PERSONA
from domain.conversation import ConversationNotFound
from domain.ids import persona_id_for
from domain.user import InvalidCredentials
from domain.transfer import to_markdown

MAX_IMPORT_BYTES = 64 * 1024 * 1024  # a ChatGPT export of a heavy user


def client_address(request: Request[Any, Any, Any], settings: Any) -> str:
    """The client's address: the peer's, or, from a trusted reverse proxy, the last hop it
    added to X-Forwarded-For (earlier hops are the client's to write, so not believed)."""
    peer = request.client.host if request.client else ""
    if peer in settings.trusted_proxies:
        hops = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",") if h.strip()]
        return hops[-1] if hops else peer
    return peer


def refuse_if(limited: Limited | None) -> None:
    if limited is not None:
        raise TooManyAttempts(limited.message, retry_after=limited.retry_after)


def checked_log_in(services: Services, address: str, email: str, password: str) -> UUID:
    """A log-in, throttled per client address and per account (api/throttle.py)."""
    refuse_if(services.throttle.attempt(address))
    refuse_if(services.throttle.account_locked(email))
    try:
        return services.app.authenticate(email, password)
    except InvalidCredentials:
        services.throttle.failed(email)
        raise


class AuthController(Controller):
    path = "/api/auth"

    @post("/register", status_code=HTTP_201_CREATED)
    async def register_user(self, request: Request[Any, Any, Any], data: schemas.Credentials,
                            services: Services) -> schemas.Registered:
        refuse_if(await services.call(services.throttle.attempt, client_address(request, services.settings)))
        user_id = await services.call(services.app.register_user, data.email, data.password)
        return schemas.Registered(user_id=user_id)

    @post("/login", status_code=HTTP_200_OK)
    async def log_in(self, request: Request[Any, Any, Any], data: schemas.Credentials,
                     services: Services) -> Response[schemas.LoggedIn]:
        user_id = await services.call(checked_log_in, services, client_address(request, services.settings),
                                      data.email, data.password)
        s = services.settings
        session_id = await services.call(services.sessions.start, user_id, request.headers.get("user-agent", ""))
        token = issue_token(s.secret_key, user_id, s.token_ttl_s, session_id)
        cookie = Cookie(key=COOKIE, value=token, httponly=True, samesite="lax", secure=s.cookie_secure,
                        max_age=s.token_ttl_s, path="/")
        return Response(schemas.LoggedIn(token=token, user_id=user_id), cookies=[cookie])

    @post("/logout", status_code=HTTP_204_NO_CONTENT)
    async def log_out(self, request: Request[Any, Any, Any], services: Services) -> Response[None]:
        """Ends the session the request was made with: its token stops working everywhere."""
        session = session_of(request, services.settings.secret_key)
        if session is not None:
            await services.call(services.sessions.end, session.user_id, session.session_id)
        return Response(None, status_code=HTTP_204_NO_CONTENT, cookies=[Cookie(key=COOKIE, value="", max_age=0, path="/")])


class MeController(Controller):
    path = "/api/me"

    @get("/")
    async def get_me(self, request: Request[Any, Any, Any], services: Services) -> schemas.Me:
        user_id = require_user(request, services.settings.secret_key)
        email = await services.call(services.app.user_email, user_id)
        consent = await services.call(services.app.training_consent, user_id)
        return schemas.Me(user_id=user_id, email=email, training_consent=consent)


class PersonaController(Controller):
    path = "/api/personas"

    @get("/")
    async def list_personas(self, request: Request[Any, Any, Any], services: Services) -> list[schemas.Persona]:
        user_id = user_of(request, services.settings.secret_key)  # anonymous: public ones only
        rows = await services.call(services.readmodels.personas, user_id)
        return [schemas.Persona(**{k: r[k] for k in schemas.Persona.__struct_fields__}) for r in rows]

    @post("/", status_code=HTTP_201_CREATED)
    async def create_persona(
        self, request: Request[Any, Any, Any], services: Services, data: schemas.PersonaCreate
    ) -> schemas.PersonaDetail:
        user_id = require_user(request, services.settings.secret_key)
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
        self, request: Request[Any, Any, Any], services: Services, persona_id: UUID, data: schemas.PersonaUpdate
    ) -> schemas.PersonaDetail:
        user_id = require_user(request, services.settings.secret_key)
        await services.call(services.app.visible_persona, persona_id, user_id)  # 404 before 403
        await services.call(services.app.edit_persona, persona_id, user_id, data.changes())
        return schemas.PersonaDetail(**await services.call(services.app.visible_persona, persona_id, user_id))

    @delete("/{persona_id:uuid}", status_code=HTTP_204_NO_CONTENT)
    async def retire_persona(self, request: Request[Any, Any, Any], services: Services, persona_id: UUID) -> None:
        user_id = require_user(request, services.settings.secret_key)
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
        self, request: Request[Any, Any, Any], services: Services, persona_id: UUID, version: int
    ) -> schemas.PersonaDetail:
        """An earlier version's fields saved as a new version (none when they are the
        current ones already); the persona as it now stands."""
        user_id = require_user(request, services.settings.secret_key)
        await services.call(services.app.visible_persona, persona_id, user_id)  # 404 before 403
        await services.call(services.app.restore_persona_version, persona_id, user_id, version)
        return schemas.PersonaDetail(**await services.call(services.app.visible_persona, persona_id, user_id))


CONVERSATION_FIELDS = tuple(schemas.Conversation.__struct_fields__)
MESSAGE_FIELDS = set(schemas.Message.__struct_fields__)


class ConversationController(Controller):
    path = "/api/conversations"

    @post("/", status_code=HTTP_201_CREATED)
    async def create_conversation(
        self, request: Request[Any, Any, Any], services: Services, data: schemas.ConversationCreate | None = None
    ) -> schemas.Conversation:
        """A new conversation; with `expires_in_s`, a temporary one, gone after that time."""
        user_id = require_user(request, services.settings.secret_key)
        persona_id = data.persona_id if data else None
        keep_for = timedelta(seconds=data.expires_in_s) if data and data.expires_in_s else None
        conversation_id = await services.call(services.app.start_conversation, user_id, persona_id, keep_for)
        persona = persona_id or persona_id_for(DEFAULT_PERSONA)
        expires_at = datetime.now(timezone.utc) + keep_for if keep_for else None
        return schemas.Conversation(id=conversation_id, persona_id=persona, title="New chat", expires_at=expires_at)

    @get("/")
    async def list_conversations(
        self, request: Request[Any, Any, Any], services: Services,
        limit: Annotated[int, Parameter(ge=1, le=200)] = 50,
        before: datetime | None = None,
        before_id: UUID | None = None,
        q: Annotated[str, Parameter(max_length=200)] = "",
        archived: bool = False,
        pinned: bool | None = None,
    ) -> list[schemas.Conversation]:
        """The user's conversations, newest first, `limit` at a time: pass the last one's
        `updated_at` as `before` and its `id` as `before_id` for the next page. `q` searches
        titles and message text; `pinned` keeps only pinned (or only unpinned) chats."""
        user_id = require_user(request, services.settings.secret_key)
        if "\x00" in q:  # PostgreSQL text cannot hold NUL, and no stored text has one
            raise ValidationException("the search text cannot contain NUL (U+0000) characters")
        if before_id is not None and before is None:
            raise ValidationException("before_id goes with before: the updated_at of the same conversation")
        rows = await services.call(services.readmodels.conversations, user_id, limit, before, q.strip(), archived,
                                   before_id=before_id, pinned=pinned)
        return [schemas.Conversation(**r) for r in rows]

    @get("/{conversation_id:uuid}")
    async def get_conversation(
        self, request: Request[Any, Any, Any], services: Services, conversation_id: UUID
    ) -> schemas.Conversation:
        user_id = require_user(request, services.settings.secret_key)
        row = await services.call(services.readmodels.conversation, conversation_id)
        if row is None or UUID(str(row["owner_id"])) != user_id:
            raise NotFoundException("no such conversation")
        return schemas.Conversation(**{k: row[k] for k in CONVERSATION_FIELDS})

    @patch("/{conversation_id:uuid}", status_code=HTTP_204_NO_CONTENT)
    async def update_conversation(
        self, request: Request[Any, Any, Any], services: Services, conversation_id: UUID,
        data: schemas.ConversationUpdate,
    ) -> None:
        """Rename (`title`), archive or unarchive (`archived`), pin or unpin (`pinned`), make
        temporary or keep for good (`expires_in_s`); recorded as events."""
        user_id = require_user(request, services.settings.secret_key)
        title = None if data.title is msgspec.UNSET else data.title
        archived = None if data.archived is msgspec.UNSET else data.archived
        pinned = None if data.pinned is msgspec.UNSET else data.pinned
        keep_for: timedelta | None | bool = False
        if data.expires_in_s is not msgspec.UNSET:
            keep_for = timedelta(seconds=data.expires_in_s) if data.expires_in_s else None
        await services.call(services.app.update_conversation, conversation_id, user_id, title, archived, keep_for,
                            pinned)

    @delete("/{conversation_id:uuid}", status_code=HTTP_204_NO_CONTENT)
    async def delete_conversation(
        self, request: Request[Any, Any, Any], services: Services, conversation_id: UUID
    ) -> None:
        user_id = require_user(request, services.settings.secret_key)
        await services.call(services.app.delete_conversation, conversation_id, user_id)

    @get("/{conversation_id:uuid}/messages")
    async def list_messages(
        self, request: Request[Any, Any, Any], services: Services, conversation_id: UUID
    ) -> list[schemas.Message]:
        """The active branch, root to leaf, each message with its siblings."""
        user_id = require_user(request, services.settings.secret_key)
        await check_owner(services, conversation_id, user_id)
        rows = await services.call(services.readmodels.branch, conversation_id)
        return [schemas.Message(**r) for r in rows]

    @post("/{conversation_id:uuid}/branch", status_code=HTTP_200_OK)
    async def select_branch(
        self, request: Request[Any, Any, Any], services: Services, conversation_id: UUID,
        data: schemas.BranchSelect,
    ) -> list[schemas.Message]:
        """Switch to the branch through `message_id` (down to its newest leaf); returns it.
        Read from the events, so the answer holds even before the read model catches up."""
        user_id = require_user(request, services.settings.secret_key)
        await services.call(services.app.select_branch, conversation_id, user_id, data.message_id)
        nodes = await services.call(services.app.branch, conversation_id, user_id)
        return [schemas.Message(**{k: v for k, v in n.items() if k in MESSAGE_FIELDS}) for n in nodes]

    @post("/{conversation_id:uuid}/messages/{message_id:uuid}/feedback", status_code=HTTP_204_NO_CONTENT)
    async def give_feedback(
        self, request: Request[Any, Any, Any], services: Services, conversation_id: UUID, message_id: UUID,
        data: schemas.Feedback,
    ) -> None:
        """Rate a reply (thumbs up or down, with an optional comment), recorded as an event.
        Without `comment` the comment given before stays."""
        user_id = require_user(request, services.settings.secret_key)
        await services.call(services.app.give_feedback, conversation_id, user_id, message_id, data.rating, data.comment)

    @delete("/{conversation_id:uuid}/messages/{message_id:uuid}/feedback", status_code=HTTP_204_NO_CONTENT)
    async def clear_feedback(
        self, request: Request[Any, Any, Any], services: Services, conversation_id: UUID, message_id: UUID,
    ) -> None:
        """Take back the rating of a reply and its comment (nothing happens if it has none)."""
        user_id = require_user(request, services.settings.secret_key)
        await services.call(services.app.clear_feedback, conversation_id, user_id, message_id)


    @get("/{conversation_id:uuid}/export")
    async def export_conversation(
        self, request: Request[Any, Any, Any], services: Services, conversation_id: UUID,
        format: Annotated[str, Parameter(pattern="^(json|markdown)$")] = "json",
    ) -> Response[Any]:
        """The conversation with every branch as JSON, or its active branch as Markdown."""
        user_id = require_user(request, services.settings.secret_key)
        export = await services.call(services.app.export_conversation, conversation_id, user_id)
        if format == "markdown":
            return Response(
                to_markdown(export), media_type="text/markdown",  # Litestar adds "; charset=utf-8"
                headers={"Content-Disposition": f'attachment; filename="conversation-{conversation_id}.md"'},
            )
        return Response(export, headers={"Content-Disposition": f'attachment; filename="conversation-{conversation_id}.json"'})

    @post("/{conversation_id:uuid}/shares", status_code=HTTP_201_CREATED)
    async def share_conversation(
        self, request: Request[Any, Any, Any], services: Services, conversation_id: UUID
    ) -> schemas.ShareCreated:
        """A read-only snapshot of the active branch as it is now, readable by anyone with
        the link until revoked."""
        user_id = require_user(request, services.settings.secret_key)
        share_id = await services.call(services.app.share_conversation, conversation_id, user_id)
        return schemas.ShareCreated(id=share_id, url=f"/s/{share_id}", api_url=f"/api/shares/{share_id}")

    @get("/{conversation_id:uuid}/shares")
    async def list_shares(
        self, request: Request[Any, Any, Any], services: Services, conversation_id: UUID
    ) -> list[schemas.ShareInfo]:
        user_id = require_user(request, services.settings.secret_key)
        await check_owner(services, conversation_id, user_id)
        rows = await services.call(services.readmodels.shares, conversation_id)
        return [schemas.ShareInfo(**r) for r in rows]

    @delete("/{conversation_id:uuid}/shares/{share_id:uuid}", status_code=HTTP_204_NO_CONTENT)
    async def revoke_share(
        self, request: Request[Any, Any, Any], services: Services, conversation_id: UUID, share_id: UUID
    ) -> None:
        user_id = require_user(request, services.settings.secret_key)
        await services.call(services.app.revoke_share, conversation_id, user_id, share_id)


class TransferController(Controller):
    path = "/api"

    @get("/export")
    async def export_all(self, request: Request[Any, Any, Any], services: Services) -> Response[Any]:
        """Every conversation of the user (archived ones too), every branch, as JSON."""
        user_id = require_user(request, services.settings.secret_key)

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
    async def import_chatgpt(self, request: Request[Any, Any, Any], services: Services) -> schemas.ImportResult:
        """Import ChatGPT's `conversations.json` (the body, as is). Conversations that cannot
        be read are listed under `skipped` with the reason; the rest are imported."""
        user_id = require_user(request, services.settings.secret_key)
        try:
            data = msgspec.json.decode(await request.body())
        except msgspec.DecodeError as e:
            raise ValidationException(f"the body is not JSON: {e}") from None
        result = await services.call(services.app.import_conversations, user_id, data)
        return schemas.ImportResult(**{**result, "skipped": [schemas.ImportSkipped(**s) for s in result["skipped"]]})


class ShareController(Controller):
    path = "/api/shares"

    @get("/{share_id:uuid}")
    async def get_share(self, services: Services, share_id: UUID) -> schemas.Share:
        """A shared snapshot: public, read-only; 404 once revoked."""
        row = await services.call(services.readmodels.share, share_id)
        if row is None:
            raise NotFoundException("no such share (it may have been revoked)")
        return schemas.Share(**row)


async def owner_of(services: Services, conversation_id: UUID) -> UUID | None:
    """The conversation's owner: the read model answers, the event store settles a
    conversation too new to have reached it."""
    row = await services.call(services.readmodels.conversation, conversation_id)
    if row is not None:
        return UUID(str(row["owner_id"]))
    try:
        return await services.call(services.app.conversation_owner, conversation_id)
    except ConversationNotFound:
        return None


async def check_owner(services: Services, conversation_id: UUID, user_id: UUID) -> None:
    """404 unless `user_id` owns the conversation."""
    if await owner_of(services, conversation_id) != user_id:
        raise NotFoundException("no such conversation")


class HealthController(Controller):
    path = "/"

    @get("/health")
    async def get_health(self) -> dict[str, str]:
        return {"status": "ok"}

    @get("/ready")
    async def get_ready(self, services: Services) -> Response[dict[str, Any]]:
        checks: dict[str, str] = {}

        def postgres() -> None:
            with services.readmodels.datastore.get_connection() as conn:
                conn.execute("SELECT 1")

        try:
            await services.call(postgres)
            checks["postgres"] = "ok"
        except Exception as e:  # noqa: BLE001
            checks["postgres"] = f"unreachable: {type(e).__name__}"
        checks["nats"] = "ok" if services.nc.is_connected else "disconnected"
        try:
            ready = await services.triton.is_model_ready(services.settings.model_name)
            checks["triton"] = "ok" if ready else "model not ready"
        except Exception as e:  # noqa: BLE001
            checks["triton"] = f"unreachable: {type(e).__name__}"
        ok = all(v == "ok" for v in checks.values())
        return Response({"ready": ok, "checks": checks}, status_code=HTTP_200_OK if ok else HTTP_503_SERVICE_UNAVAILABLE)
