"""An OpenAI-compatible API on top of the chat pipeline: `/v1/models` and
`/v1/chat/completions` take `Authorization: Bearer sk-chat-...` (the keys: api/api_keys.py),
so the official `openai` clients work with `base_url=<server>/v1`. OpenAI's request and
response bodies and its error shape are in api/openai_schemas.py.

A completion is a chat like any other, recorded as events: the request starts a new
`Conversation` for the key's user with the persona the `model` names (ChatApplication.persona_for_model: the
user's own or a built-in persona by slug, any other by id); its earlier
user/assistant turns are imported (`TurnsImported`, part of the prompt from then on) and its
system (or developer) messages become extra instructions appended to the persona's system
prompt; its last user message goes through `ChatApplication.post_message`, with the
request's `temperature`, `top_p`, `max_tokens` (or `max_completion_tokens`) and `seed`
pinned in the `ReplyRequested` for this reply only. A key whose `list_apart` is set has
the chats it starts marked to be kept out of the chat list. The relay, a worker and Triton then do
what they do for the websocket: the handler subscribes to the conversation's token subject
*before* posting, and turns the reply, as the reply stream it shares with the websocket
follows it (api/reply_stream.py's `ReplyFollower`: offsets, gaps, an end lost on the way
taken from the read model, every wait bounded), into one `chat.completion` (its `usage`
read from the recorded `ReplyCompleted`) or into server-sent `chat.completion.chunk`
events ending with `data: [DONE]`; the chunks' texts add up to the reply. Nothing heard
of the reply for `REPLY_IDLE_TIMEOUT_S` (api/reply_stream.py) is a 504. A streaming
client that goes away stops the generation.

A completion's id is `chatcmpl-<reply id, hex>` and the `x-chat-conversation-id` header
names the conversation that records it. Errors have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with the status codes that
`api.errors.ERROR_STATUS` gives the domain errors (401 bad key, 404 unknown model, 400 bad
request), and 429 with `Retry-After` when the user's message rate or daily token quota,
shared with the websocket (`api.limits`), is used up.

Not supported: `n` > 1 (400), tools and function calls, non-text content parts (400),
logprobs; `stop`, `user`, the penalties and other unknown fields are accepted and ignored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID, uuid4

import anyio
import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import Provide
from litestar.exceptions import HTTPException, TooManyRequestsException
from litestar.response import Stream
from opentelemetry.trace import SpanKind

from api.openai_schemas import (
    HTTP_CODES,
    OPENAI_ERRORS,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChunkChoice,
    Delta,
    Model,
    ModelList,
    Usage,
    openai_error_body,
)
from api.reply_stream import ReplyFollower, ReplyTimeout
from api.services import Services
from chatbot.bus.messaging import ReplyDone, ReplyError, cancel_subject
from chatbot.inference.errors import INVALID_REQUEST
from chatbot.runtime.tracing import span
from domain.app_accounts import ApiKeyHolder
from domain.conversation_errors import InvalidSampling, InvalidTurns
from domain.conversation_rules import check_sampling
from domain.persona import PersonaNotFound
from domain.user import InvalidCredentials

log = logging.getLogger("api.openai")
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "stop"}
encoder = msgspec.json.Encoder()

# -- pure logic -------------------------------------------------------------------------------


def text_of(message: ChatMessage, index: int) -> str:
    """A message's text: a string, or the text parts of a content list."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise InvalidTurns(f"messages[{index}]: only text content is supported, not {part.type!r}")
        texts.append(part.text)
    return "".join(texts)


def split_messages(messages: list[ChatMessage]) -> tuple[str, list[dict[str, str]], str]:
    """A request's messages -> (system instructions, earlier turns, the last user message)."""
    instructions: list[str] = []
    turns: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        text = text_of(message, i)
        if message.role in ("system", "developer"):
            if text.strip():
                instructions.append(text.strip())
        elif message.role in ("user", "assistant"):
            turns.append({"role": message.role, "content": text})
        else:
            raise InvalidTurns(
                f"messages[{i}]: the role {message.role!r} is not supported (system, developer, user, assistant)"
            )
    if not turns or turns[-1]["role"] != "user":
        raise InvalidTurns("the last message (system messages aside) must come from the user")
    return "\n\n".join(instructions), turns[:-1], turns[-1]["content"]


def sampling_of(data: ChatCompletionRequest) -> dict[str, Any]:
    """The request's sampling parameters that override the persona's, checked."""
    if data.n not in (None, 1):
        raise InvalidSampling("n must be 1: one choice per request")
    sampling = {
        "temperature": data.temperature, "top_p": data.top_p, "seed": data.seed,
        "max_tokens": data.max_completion_tokens if data.max_completion_tokens is not None else data.max_tokens,
    }
    sampling = {k: v for k, v in sampling.items() if v is not None}
    check_sampling(**sampling)
    return sampling


def bearer_key(request: Request[Any, Any, Any]) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise InvalidCredentials("missing API key: send the header 'Authorization: Bearer sk-chat-...'")
    return key.strip()


async def check_rate(services: Services, user_id: UUID) -> None:
    """Count the completion against the user's limits, shared with the websocket (429)."""
    limited = await services.call(services.limits.check_send, user_id)
    if limited is not None:
        raise TooManyRequestsException(limited.message, headers={"Retry-After": str(limited.retry_after)})


async def api_key_holder(request: Request[Any, Any, Any], services: Services) -> ApiKeyHolder:
    """The request's API key, valid (401 otherwise), its use noted in the background."""
    holder = await services.call(services.app.api_key_holder, bearer_key(request))
    services.key_use.note(holder.user_id, holder.key_id, services.call)
    return holder


async def api_key_user(api_key: ApiKeyHolder) -> UUID:
    """The owner of the request's API key."""
    return api_key.user_id


# -- a reply's end in OpenAI's terms ----------------------------------------------------------


def timed_out(timeout: ReplyTimeout) -> HTTPException:
    """Nothing heard of the reply for too long (api/reply_stream.py's bound): 504."""
    return HTTPException(status_code=504, detail=f"no reply within {timeout.waited_s:.0f} s: try again")


def reply_failed(error: ReplyError) -> HTTPException:
    """A failed reply: 400 when the request itself was at fault, else 502."""
    if INVALID_REQUEST in error.message:
        return HTTPException(status_code=400, detail=error.message.split(INVALID_REQUEST, 1)[1])
    return HTTPException(status_code=502, detail=f"the reply failed: {error.message}")


# -- controllers ------------------------------------------------------------------------------


class OpenAIController(Controller):
    path = "/v1"
    dependencies = {"api_key": Provide(api_key_holder), "user_id": Provide(api_key_user)}
    exception_handlers = OPENAI_ERRORS

    @get("/models")
    async def list_models(self, services: Services, user_id: UUID) -> ModelList:
        rows = await services.call(services.readmodels.personas, user_id)
        return ModelList(data=[model_of(r, user_id) for r in rows])

    @get("/models/{model:str}")
    async def get_model(self, services: Services, user_id: UUID, model: str) -> Model:
        rows = await services.call(services.readmodels.personas, user_id)
        for row in rows:
            if model_of(row, user_id).id == model:
                return model_of(row, user_id)
        raise unknown_model(model)

    @post("/chat/completions", status_code=200)
    async def create_chat_completion(
        self, services: Services, api_key: ApiKeyHolder, user_id: UUID, data: ChatCompletionRequest
    ) -> Response[Any]:
        # the request's trace starts here, as a websocket message's does at its frame
        # (chatbot/runtime/tracing.py): the commands' events carry it on to the relay, the worker and
        # the projector; a streamed reply goes on after this span ends
        with span("POST /v1/chat/completions", SpanKind.SERVER):
            return await self._complete(services, api_key, user_id, data)

    async def _complete(
        self, services: Services, api_key: ApiKeyHolder, user_id: UUID, data: ChatCompletionRequest
    ) -> Response[Any]:
        instructions, turns, text = split_messages(data.messages)
        sampling = sampling_of(data)
        await check_rate(services, user_id)
        follower: ReplyFollower | None = None
        completion: Completion | None = None
        streaming = done = False
        try:
            try:
                persona_id = await services.call(services.app.persona_for_model, user_id, data.model)
                conversation_id = await services.call(
                    services.app.start_imported_conversation, user_id, persona_id, turns, instructions,
                    api_key.key_id if api_key.list_apart else None,
                )
            except PersonaNotFound:
                raise unknown_model(data.model) from None
            follower = ReplyFollower(services, conversation_id)
            await follower.open()
            posted = await services.call(
                post_message, services, conversation_id, user_id, str(uuid4()), text, sampling
            )
            completion = Completion(services, follower, data, conversation_id, posted.reply_id)
            headers = {"x-chat-conversation-id": str(conversation_id)}
            if data.stream:
                streaming = True  # from here the stream owns the subscription
                return Stream(completion.sse(), media_type="text/event-stream",
                              headers={**headers, "cache-control": "no-cache"})
            body = await completion.collect()
            done = True
            return Response(body, headers=headers)
        finally:
            if not streaming:
                if completion is not None and not done:  # failed or timed out: stop generating
                    await services.nc.publish(cancel_subject(completion.reply_id), b"")
                if follower is not None:
                    await follower.close()


def post_message(services: Services, *args: Any) -> Any:
    """`ChatApplication.post_message` in a span of its own, as the websocket's commands are."""
    with span("command post_message"):
        return services.app.post_message(*args)


def model_of(row: dict[str, Any], user_id: UUID) -> Model:
    """Built-in and the user's own personas by slug; other users' public ones by id (slugs
    are unique per creator only)."""
    mine = row["owner_id"] is None or row["owner_id"] == user_id
    return Model(id=row["slug"] if mine else str(row["id"]), created=int(row["updated_at"].timestamp()),
                 owned_by="chatbot")


def unknown_model(model: str) -> PersonaNotFound:
    return PersonaNotFound(f"the model {model!r} does not exist or you do not have access to it")


class Completion:
    """One reply of the pipeline, told in OpenAI's terms."""

    def __init__(self, services: Services, follower: ReplyFollower, data: ChatCompletionRequest,
                 conversation_id: UUID, reply_id: UUID) -> None:
        self.services, self.follower, self.data = services, follower, data
        self.conversation_id, self.reply_id = conversation_id, reply_id
        self.id = f"chatcmpl-{reply_id.hex}"
        self.created = int(time.time())

    async def outcome(self) -> dict[str, Any]:
        """The recorded `ReplyCompleted`: token counts, finish reason, model version."""
        job = await self.services.call(self.services.app.reply_job, self.conversation_id, self.reply_id)
        return job.outcome

    @staticmethod
    def usage(outcome: dict[str, Any]) -> Usage:
        prompt, completion = int(outcome.get("prompt_tokens", 0)), int(outcome.get("completion_tokens", 0))
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def collect(self) -> ChatCompletion:
        try:
            async for event in self.follower.events(self.reply_id):
                if isinstance(event, str):
                    continue  # the whole text comes with the end
                if isinstance(event, ReplyError):
                    raise reply_failed(event)
                return await self.completion(event)
        except ReplyTimeout as e:
            raise timed_out(e) from None
        raise HTTPException(status_code=502, detail="the reply ended without an outcome")

    async def completion(self, done: ReplyDone) -> ChatCompletion:
        outcome = await self.outcome()
        return ChatCompletion(
            id=self.id, created=self.created, model=self.data.model,
            choices=[Choice(index=0, message=AssistantMessage(content=done.text),
                            finish_reason=FINISH_REASONS.get(done.finish_reason, "stop"))],
            usage=self.usage(outcome),
            system_fingerprint=f"{outcome.get('model_name', '')}/{outcome.get('model_version', '')}",
        )

    def chunk(self, delta: Delta, finish_reason: str | None = None) -> bytes:
        return sse_event(ChatCompletionChunk(
            id=self.id, created=self.created, model=self.data.model,
            choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)],
        ))

    async def sse(self) -> AsyncIterator[bytes]:
        """Server-sent events: a role chunk, content chunks, a finish chunk, a usage chunk
        if asked for, `[DONE]`. A failure after the stream began is an `error` event."""
        finished = False
        try:
            yield self.chunk(Delta(role="assistant", content=""))
            async for event in self.follower.events(self.reply_id):
                if isinstance(event, str):
                    yield self.chunk(Delta(content=event))
                    continue
                finished = True
                if isinstance(event, ReplyError):
                    yield error_event(reply_failed(event))
                    return
                yield self.chunk(Delta(), FINISH_REASONS.get(event.finish_reason, "stop"))
                options = self.data.stream_options
                if options is not None and options.include_usage:
                    usage = self.usage(await self.outcome())
                    yield sse_event(ChatCompletionChunk(id=self.id, created=self.created, model=self.data.model,
                                                        choices=[], usage=usage))
            yield b"data: [DONE]\n\n"
        except ReplyTimeout as e:
            yield error_event(timed_out(e))
        except HTTPException as e:
            yield error_event(e)
        finally:
            with anyio.CancelScope(shield=True):
                if not finished:  # the client went away (or we gave up): stop generating
                    await self.services.nc.publish(cancel_subject(self.reply_id), b"")
                await self.follower.close()


def sse_event(body: Any) -> bytes:
    return b"data: " + encoder.encode(body) + b"\n\n"


def error_event(error: HTTPException) -> bytes:
    """An error after the stream began, in OpenAI's shape."""
    return sse_event(openai_error_body(error.status_code, HTTP_CODES.get(error.status_code, "error"), str(error.detail)))
