"""The chat list beside every page: pinned chats first, then the rest newest first, a page
at a time, grouped by date (Today, Yesterday, Previous 7 days, Previous 30 days, then by
month), as ChatGPT and Open WebUI group theirs.

Dates are the viewer's: the script stores the browser's time zone in the `tz` cookie (an
IANA name, checked here); without it, UTC. A page ends with a cursor, the last row's
`updated_at` and id, that the "More chats" link carries (keyset paging: a chat updated
meanwhile moves to the top instead of shifting every later page). Chats without a message
are left out (a chat started and left empty is no clutter), except the one on screen and
in the archive (archiving one is a choice). Chats an API key started with its `list_apart`
setting on have a list of their own (`view=api`); a search and the archive show every chat."""

from __future__ import annotations

from datetime import date, datetime, timezone, tzinfo
from typing import Any
from urllib.parse import urlencode
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from api.services import Services

PAGE = 50  # chats per page of the list
PINNED_MAX = 200  # pinned chats shown above the list: the newest 200 (more are not shown)
TZ_COOKIE = "tz"
VIEWS = ("", "api")  # the user's own chats, or those made with API keys that list theirs apart


def timezone_of(name: str | None) -> tzinfo:
    """The time zone an IANA name names; UTC for none or anything else."""
    if not name or len(name) > 64 or ".." in name or name.startswith("/"):
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return timezone.utc


def date_label(day: date, today: date) -> str:
    """The group a chat last active on `day` falls in, seen on `today`."""
    age = (today - day).days
    if age <= 0:
        return "Today"
    if age == 1:
        return "Yesterday"
    if age <= 7:
        return "Previous 7 days"
    if age <= 30:
        return "Previous 30 days"
    return f"{day:%B %Y}"


def group_by_date(rows: list[dict[str, Any]], now: datetime, tz: tzinfo) -> list[tuple[str, list[dict[str, Any]]]]:
    """Consecutive rows (newest first) under their date labels, in order."""
    today = now.astimezone(tz).date()
    groups: list[tuple[str, list[dict[str, Any]]]] = []
    for row in rows:
        label = date_label(row["updated_at"].astimezone(tz).date(), today)
        if not groups or groups[-1][0] != label:
            groups.append((label, []))
        groups[-1][1].append(row)
    return groups


def more_link(rows: list[dict[str, Any]], q: str, archived: bool, view: str) -> str | None:
    """The next page's URL after a full page, else None."""
    if len(rows) < PAGE:
        return None
    last = rows[-1]
    params: dict[str, str] = {"before": last["updated_at"].isoformat(), "before_id": str(last["id"])}
    if q:
        params["q"] = q
    if archived:
        params["archived"] = "true"
    if view:
        params["view"] = view
    return "/c?" + urlencode(params)


async def chat_list(
    services: Services, user_id: UUID, q: str = "", archived: bool = False, view: str = "",
    current: UUID | None = None, before: datetime | None = None, before_id: UUID | None = None,
) -> dict[str, Any]:
    """What the sidebar shows: `pinned` (on the first page of the plain list only), one page
    of `conversations`, the `more` link, and whether the user has chats made with API keys."""
    q = q.replace("\x00", "")
    via_api = view == "api"
    plain = not q and not archived and not via_api  # the main list: its pins stand above every page
    readmodels = services.readmodels
    pinned = await services.call(
        readmodels.conversations, user_id, PINNED_MAX, None, "", False, pinned=True, via_api=False,
        hide_empty=True, keep=current,
    ) if plain and before is None else []
    rows = await services.call(
        readmodels.conversations, user_id, PAGE, before, q, archived, before_id=before_id,
        pinned=False if plain else None, via_api=None if q or archived else via_api, hide_empty=not archived,
        keep=current,
    )
    api_chats = via_api or bool(await services.call(readmodels.conversations, user_id, 1, via_api=True))
    return {
        "pinned": [dict(r) for r in pinned], "conversations": [dict(r) for r in rows],
        "more": more_link(rows, q, archived, view), "q": q, "archived": archived, "view": view,
        "api_chats": api_chats, "older": before is not None,
    }


def with_groups(context: dict[str, Any], tz_name: str | None, now: datetime | None = None) -> dict[str, Any]:
    """The page's context with its chat list grouped by date in the viewer's time zone."""
    if "conversations" in context and "conversation_groups" not in context:
        moment = now or datetime.now(timezone.utc)
        context["conversation_groups"] = group_by_date(context["conversations"], moment, timezone_of(tz_name))
    return context

