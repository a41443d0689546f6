"""The colour theme: follow the system (the default), or always light, or always dark.

The choice is a cookie set by a form post, so it works without the script and holds for
the pages before logging in too; `render()` turns it into `<html data-theme>` (no cookie:
none, and style.css follows `prefers-color-scheme`)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, post
from litestar.datastructures import Cookie
from litestar.response import Redirect

from api.services import Services
from web.pages.common import THEME_COOKIE, THEMES, FormError, redirect, safe_next

YEAR_S = 365 * 86_400
NOTES = {
    "system": "The theme now follows your system's setting.",
    "light": "The light theme is on.",
    "dark": "The dark theme is on.",
}


class ThemePages(Controller):
    """`POST /theme` with `theme` (system, light or dark) and `next`, the page to go back to."""

    path = "/theme"
    include_in_schema = False

    @post("/")
    async def choose_theme(self, request: Request[Any, Any, Any], services: Services) -> Redirect:
        form = await request.form()
        theme = form.get("theme")
        if theme not in NOTES:
            raise FormError("choose a theme: system, light or dark")
        settings = services.settings
        cookie = (Cookie(key=THEME_COOKIE, value=theme, max_age=YEAR_S, path="/", httponly=True, samesite="lax",
                         secure=settings.cookie_secure) if theme in THEMES
                  else Cookie(key=THEME_COOKIE, value="", max_age=0, path="/"))
        return redirect(services, safe_next(str(form.get("next", "")), "/account"), NOTES[theme], cookies=[cookie])
