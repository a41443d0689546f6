"""The limits and checks of a conversation's content, apart from the `Conversation` aggregate
(domain/conversation.py) that enforces them: how long a title, an import or a retention may
be, the rule that titles a conversation from its first message, the sampling a caller may
set for one reply, and how an import is cut into runs of bounded size."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

from domain.conversation_errors import InvalidSampling, InvalidTitle

MAX_TITLE = 80
MAX_IMPORTED_TURNS = 256
IMPORTABLE_ROLES = ("user", "assistant")
# Sampling parameters a caller may set for one reply (pinned in its `ReplyRequested`).
MAX_REPLY_TOKENS = 2048  # as for a persona; the model's context window bounds it further
RATINGS = ("up", "down")
MAX_COMMENT = 1000
MIN_RETENTION = timedelta(minutes=1)
MAX_RETENTION = timedelta(days=365)
MAX_IMPORTED_NODES = 5000  # messages of one conversation brought in from an export
T = TypeVar("T")


def bounded_runs(items: list[T], size_of: Callable[[T], int], max_size: int) -> Iterator[list[T]]:
    """Consecutive runs of `items` whose sizes total at most `max_size` (a bigger item goes
    alone), in order: for imported messages, parents stay before their children."""
    run: list[T] = []
    size = 0
    for item in items:
        if run and size + size_of(item) > max_size:
            yield run
            run, size = [], 0
        run.append(item)
        size += size_of(item)
    if run:
        yield run


def make_title(text: str, max_words: int = 8) -> str:
    """A short title from a message: its first line, at most `max_words` words, without
    Markdown markers or a trailing full stop, comma or colon."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "").strip()
    line = line.lstrip("#>*-` ").replace("**", "").replace("`", "")
    words = line.split()
    title = " ".join(words[:max_words])
    if len(words) > max_words:
        title += "…"
    title = title.rstrip(" .,;:")[:MAX_TITLE]
    return (title[:1].upper() + title[1:]) or "New chat"


def check_title(title: str) -> str:
    title = " ".join(title.split())
    if not title:
        raise InvalidTitle("a title needs some text")
    if len(title) > MAX_TITLE:
        raise InvalidTitle(f"a title has at most {MAX_TITLE} characters")
    if "\x00" in title:
        raise InvalidTitle("a title cannot contain NUL (U+0000) characters")
    if not is_unicode(title):
        raise InvalidTitle("a title is Unicode text: it cannot hold a lone surrogate (such as \\ud800)")
    return title


def is_unicode(text: str) -> bool:
    """Whether `text` can be stored: JSON can spell a lone UTF-16 surrogate (\\ud800), which
    no UTF-8 text (the event store's, PostgreSQL's) can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_sampling(
    temperature: float | None = None,
    top_p: float | None = None,
    max_tokens: int | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The sampling overrides that are set, checked; InvalidSampling names a bad one."""
    params: dict[str, Any] = {}
    if temperature is not None:
        if not 0.0 <= temperature <= 2.0:  # also rejects NaN
            raise InvalidSampling(f"temperature must be in [0, 2], got {temperature}")
        params["temperature"] = float(temperature)
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise InvalidSampling(f"top_p must be in (0, 1], got {top_p}")
        params["top_p"] = float(top_p)
    if max_tokens is not None:
        if not 1 <= max_tokens <= MAX_REPLY_TOKENS:
            raise InvalidSampling(f"max_tokens must be in [1, {MAX_REPLY_TOKENS}], got {max_tokens}")
        params["max_tokens"] = int(max_tokens)
    if seed is not None:
        if not -(2**63) <= seed < 2**63:
            raise InvalidSampling("seed must fit in 64 bits")
        params["seed"] = int(seed)
    return params
