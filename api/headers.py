"""Security headers for the API documentation pages (`/schema`, Litestar's OpenAPI pages).

The web UI's pages carry a strict Content-Security-Policy of their own (web/pages/common.py). The
documentation pages are Litestar's: HTML that loads its viewer (ReDoc, Swagger UI, ...) from
a CDN and starts it with an inline script, so they get a policy of their own that allows
exactly that, and nothing else: no other hosts, no plugins, no framing, no forms. The JSON
and YAML schema documents get the same headers (a policy on a non-HTML response costs
nothing).
"""

from __future__ import annotations

from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send

DOCS_PREFIX = "/schema"
CDN = "https://cdn.jsdelivr.net https://unpkg.com"
DOCS_CSP = (
    f"default-src 'none'; script-src 'self' 'unsafe-inline' {CDN}; style-src 'self' 'unsafe-inline' {CDN} "
    "https://fonts.googleapis.com; font-src https://fonts.gstatic.com; img-src 'self' data: "
    f"https://cdn.redoc.ly; connect-src 'self'; worker-src blob:; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
DOCS_HEADERS = [
    (b"content-security-policy", DOCS_CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]


def docs_headers() -> Any:
    """The ASGI middleware factory Litestar takes (`middleware=[docs_headers()]`)."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def add_headers(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or not scope["path"].startswith(DOCS_PREFIX):
                return await app(scope, receive, send)

            async def send_with_headers(message: Message) -> None:
                if message["type"] == "http.response.start":
                    present = {name.lower() for name, _ in message.get("headers", [])}
                    extra = [(name, value) for name, value in DOCS_HEADERS if name not in present]
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
                await send(message)

            await app(scope, receive, send_with_headers)

        return add_headers

    return middleware
