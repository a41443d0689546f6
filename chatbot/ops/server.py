"""The HTTP server process: the API (api/app.py) with the web UI's server-rendered pages
(web/pages) in one Litestar application, so a browser's pages and its websocket share an
origin and a session cookie. `chatbot api` serves `create_app` with uvicorn."""

from __future__ import annotations

from litestar import Litestar

from api.app import create_app as create_api
from chatbot.runtime.config import load_settings
from web.pages import page_handlers, template_config


def create_app() -> Litestar:
    settings = load_settings()
    return create_api(settings, pages=page_handlers(settings), template_config=template_config)
