"""OpenAI's wire format for the `/v1` routes (api/openai_compat.py): the request and
response bodies of `chat/completions` and `models`, and errors in OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`: domain errors take their status from
`api.errors.ERROR_STATUS` (the one mapping, shared with the rest of the API) and a code
OpenAI's clients know (`invalid_api_key`, `model_not_found`); HTTP errors keep theirs.
Fields of a request not listed here are accepted and ignored.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

from api.errors import ERROR_STATUS, detail_of
from domain.conversation_errors import ConversationError
from domain.persona import PersonaError
from domain.user import UserError

log = logging.getLogger("api.openai")


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct):
    """OpenAI's request body; fields not listed here are accepted and ignored."""

    model: str
    messages: list[ChatMessage]
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None  # ignored: the model stops at its end-of-turn token
    user: str | None = None  # ignored: the key already names the user
    stream_options: StreamOptions | None = None


class Model(msgspec.Struct):
    id: str
    created: int
    owned_by: str
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[Model]
    object: str = "list"


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(msgspec.Struct):
    content: str
    role: str = "assistant"


class Choice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    object: str = "chat.completion"


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    object: str = "chat.completion.chunk"


# -- errors in OpenAI's shape -----------------------------------------------------------------

OPENAI_CODES = {"invalid_credentials": "invalid_api_key", "persona_not_found": "model_not_found"}
HTTP_CODES = {400: "invalid_request", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
              429: "rate_limit_exceeded", 502: "reply_failed", 504: "timeout"}


def error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


def openai_error_body(status: int, code: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": None, "code": code}}


def openai_error(_: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    """Domain errors get their status from `api.errors.ERROR_STATUS` (the one mapping), then
    OpenAI's error shape; HTTP errors keep theirs."""

    status, code, message, headers = 500, "internal_error", "internal error", None
    if isinstance(exc, HTTPException):
        status, message, headers = exc.status_code, str(exc.detail), exc.headers
        code = HTTP_CODES.get(status, "error")
        if exc.extra:
            message = f"{message}: {exc.extra}"
    else:
        for cls, mapped_status, mapped_code in ERROR_STATUS:
            if isinstance(exc, cls):
                status, code, message = mapped_status, OPENAI_CODES.get(mapped_code, mapped_code), detail_of(exc)
                break
        else:
            log.error("unexpected error", exc_info=exc)
    return Response(openai_error_body(status, code, message), status_code=status, headers=headers)


OPENAI_ERRORS: dict[type[Exception], Any] = {
    cls: openai_error for cls in (HTTPException, UserError, ConversationError, PersonaError, Exception)
}
