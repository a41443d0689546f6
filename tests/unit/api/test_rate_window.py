"""The sliding minute of the message rate limit (api/limits.py), as pure arithmetic."""

from __future__ import annotations

from api.limits import WINDOW_S, retry_after, sliding_count

LIMIT = 60


def allowed(previous: int, elapsed: float) -> int:
    """How many sends in a row the current minute lets through at `elapsed`."""
    place = 0
    while sliding_count(place + 1, previous, elapsed) <= LIMIT:
        place += 1
    return place


def test_a_burst_across_a_minute_boundary_is_held_to_the_limit() -> None:
    # 60 sends at the end of one minute, then a burst 2.6 s into the next: a fixed window
    # let 60 more through; the sliding one lets through what left the last 60 s (~2)
    assert allowed(previous=60, elapsed=2.6 / WINDOW_S) == 2
    assert allowed(previous=60, elapsed=0.5) == 30
    assert allowed(previous=0, elapsed=0.0) == LIMIT


def test_retry_after_points_at_when_a_send_fits_again() -> None:
    elapsed = 2.6 / WINDOW_S
    wait = retry_after(place=3, previous=60, elapsed=elapsed, limit=LIMIT)
    later = elapsed + wait / WINDOW_S
    assert sliding_count(3, 60, later) <= LIMIT < sliding_count(3, 60, later - 2 / WINDOW_S)
    # over the limit within this minute alone: the next minute
    assert retry_after(place=61, previous=0, elapsed=0.25, limit=LIMIT) == 46
    assert retry_after(place=61, previous=10, elapsed=0.99, limit=LIMIT) >= 1
