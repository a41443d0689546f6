"""The Jinja environment of the pages: filters, the static files' version."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jinja2 import Environment
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.template.config import TemplateConfig

from web.pages.common import (
    STATIC,
    TEMPLATES,
)
from web.rendering import render_markdown


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

