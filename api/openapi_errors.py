"""Every error status an operation can answer, written into the OpenAPI schema.

Litestar documents only the errors a handler declares (and 400 for validation), while any
`/api` operation may also answer what the layers around it decide: 401 without a session,
403 for a foreign origin (api/csrf.py), 404 for what is not the user's, 409 on a conflict,
413 for a body over the limit, 415 for a body that is not JSON, 429 when rate-limited and
503 when the store is busy. `document_errors` adds those to every operation with the body
they have (`api.errors.error_body`; OpenAI's error object on `/v1`), so a client generated from
the schema, or a checker such as schemathesis, meets no undocumented status; and a 204
is documented without a body, as it is sent.
"""

from __future__ import annotations

from http import HTTPStatus

from litestar.openapi.spec import (
    OpenAPI,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Schema,
)

API_ERRORS = (400, 401, 403, 404, 409, 413, 415, 429, 503)
OPENAI_ERRORS = (400, 401, 404, 413, 429, 503, 504)

ERROR = Schema(
    type=OpenAPIType.OBJECT,
    required=["status_code", "code", "detail"],
    properties={
        "status_code": Schema(type=OpenAPIType.INTEGER),
        "code": Schema(type=OpenAPIType.STRING, description="a stable word to branch on, e.g. not_found, rate_limited"),
        "detail": Schema(type=OpenAPIType.STRING, description="what went wrong, for people"),
        "extra": Schema(type=[OpenAPIType.NULL, OpenAPIType.OBJECT, OpenAPIType.ARRAY]),
    },
)
OPENAI_ERROR = Schema(
    type=OpenAPIType.OBJECT,
    required=["error"],
    properties={"error": Schema(
        type=OpenAPIType.OBJECT,
        required=["message", "type"],
        properties={
            "message": Schema(type=OpenAPIType.STRING),
            "type": Schema(type=OpenAPIType.STRING),
            "param": Schema(type=[OpenAPIType.STRING, OpenAPIType.NULL]),
            "code": Schema(type=[OpenAPIType.STRING, OpenAPIType.NULL]),
        },
    )},
)
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def document_errors(schema: OpenAPI) -> None:
    """Add the error responses each operation may give, in place (replacing Litestar's
    generic 400, whose body is now this shape too)."""
    for path, item in (schema.paths or {}).items():
        if path.startswith("/v1/"):
            statuses, body = OPENAI_ERRORS, OPENAI_ERROR
        elif path.startswith("/api/"):
            statuses, body = API_ERRORS, ERROR
        else:
            continue
        for method in METHODS:
            operation = getattr(item, method, None)
            if operation is None:
                continue
            responses = operation.responses if operation.responses is not None else {}
            if "204" in responses:  # no content means no body (Litestar documents a JSON null)
                responses["204"].content = None
            for status in statuses:
                responses[str(status)] = OpenAPIResponse(
                    description=HTTPStatus(status).phrase,
                    content={"application/json": OpenAPIMediaType(schema=body)},
                )
            operation.responses = responses
