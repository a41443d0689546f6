"""The chat list's pure parts: date groups in the viewer's time zone, the next page's link."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from urllib.parse import parse_qs, urlsplit
from uuid import uuid4
from zoneinfo import ZoneInfo

from web.chat_list import (
    PAGE,
    date_label,
    group_by_date,
    more_link,
    timezone_of,
    with_groups,
)

NOW = datetime(2026, 12, 6, 3, 30, tzinfo=timezone.utc)


def row(updated_at: datetime) -> dict:
    return {"id": uuid4(), "title": "t", "updated_at": updated_at}


def test_dates_fall_in_the_groups_chat_apps_use() -> None:
    today = date(2026, 12, 6)
    assert date_label(today, today) == "Today"
    assert date_label(date(2026, 12, 5), today) == "Yesterday"
    assert date_label(date(2026, 12, 4), today) == "Previous 7 days"
    assert date_label(date(2026, 11, 29), today) == "Previous 7 days"
    assert date_label(date(2026, 11, 28), today) == "Previous 30 days"
    assert date_label(date(2026, 11, 6), today) == "Previous 30 days"
    assert date_label(date(2026, 11, 5), today) == "November 2026"
    assert date_label(date(2025, 12, 31), today) == "December 2025"
    assert date_label(date(2026, 12, 7), today) == "Today"  # a clock slightly ahead


def test_groups_keep_the_order_and_follow_the_viewers_time_zone() -> None:
    rows = [row(NOW), row(NOW - timedelta(hours=5)), row(NOW - timedelta(days=3)), row(NOW - timedelta(days=90))]
    utc = group_by_date(rows, NOW, timezone.utc)
    assert [(label, len(items)) for label, items in utc] == [
        ("Today", 1), ("Yesterday", 1), ("Previous 7 days", 1), ("September 2026", 1)]
    assert [r for _, items in utc for r in items] == rows
    # 03:30 UTC is still the 5th in New York: the first two rows are both "today" there
    new_york = group_by_date(rows, NOW, ZoneInfo("America/New_York"))
    assert [(label, len(items)) for label, items in new_york][:2] == [("Today", 2), ("Previous 7 days", 1)]
    assert group_by_date([], NOW, timezone.utc) == []


def test_a_time_zone_cookie_is_checked() -> None:
    assert timezone_of("Europe/Lisbon") == ZoneInfo("Europe/Lisbon")
    for bad in (None, "", "Mars/Olympus", "../../etc/passwd", "/etc/localtime", "x" * 65, "Europe/../UTC"):
        assert timezone_of(bad) == timezone.utc, bad


def test_the_next_page_link_carries_the_last_rows_cursor_and_the_lists_filters() -> None:
    rows = [row(NOW - timedelta(minutes=i)) for i in range(PAGE)]
    assert more_link(rows[:-1], "", False, "") is None  # a short page is the last
    link = more_link(rows, "lisbon trip", True, "api")
    assert link is not None and link.startswith("/c?")
    params = {k: v[0] for k, v in parse_qs(urlsplit(link).query).items()}
    assert params == {"before": rows[-1]["updated_at"].isoformat(), "before_id": str(rows[-1]["id"]),
                      "q": "lisbon trip", "archived": "true", "view": "api"}
    plain = {k for k in parse_qs(urlsplit(more_link(rows, "", False, "") or "").query)}
    assert plain == {"before", "before_id"}


def test_a_page_context_gets_its_groups_once() -> None:
    context = {"conversations": [row(NOW)]}
    with_groups(context, "Asia/Tokyo", now=NOW)
    assert context["conversation_groups"] == [("Today", context["conversations"])]
    assert with_groups({"other": 1}, None) == {"other": 1}  # a page without the list
