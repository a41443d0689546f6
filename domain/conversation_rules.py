"""The limits and checks of a conversation's content, apart from the `Conversation` aggregate
(domain/conversation.py) that enforces them: how long a title, an import or a retention may
be, the rule that titles a conversation from its first message, the sampling a caller may
set for one reply, and how an import is cut into runs of bounded size."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

from domain.conversation_errors import (
    ConversationError,
    EmptyMessage,
    InvalidCharacters,
    InvalidSampling,
    InvalidTitle,
    InvalidTurns,
    MessageTooLong,
)

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


def check_message(text: str, max_chars: int) -> None:
    if not text:
        raise EmptyMessage("a message needs some text")
    if len(text) > max_chars:
        split = "two messages" if len(text) <= 2 * max_chars else "several messages"
        raise MessageTooLong(f"your message is {len(text):,} characters long; the limit is {max_chars:,}. "
                             f"Shorten it or split it into {split}")
    if "\x00" in text:
        raise InvalidCharacters("a message cannot contain NUL (U+0000) characters")
    if not is_unicode(text):
        raise InvalidCharacters("a message is Unicode text: it cannot hold a lone surrogate (such as \\ud800)")


def check_imported_tree(nodes: list[dict[str, Any]], current: Any, max_chars: int) -> None:
    """An exported tree ({"id", "parent_id", "role", "text"}, parents first) that can be
    brought in whole: bounded, each message checked, `current` one of them."""
    if not nodes:
        raise InvalidTurns("there are no messages to import")
    if len(nodes) > MAX_IMPORTED_NODES:
        raise InvalidTurns(f"at most {MAX_IMPORTED_NODES} messages, got {len(nodes)}")
    seen: set[Any] = set()
    for i, node in enumerate(nodes):
        if node["role"] not in IMPORTABLE_ROLES:
            raise InvalidTurns(f"message {i}: the role is one of {list(IMPORTABLE_ROLES)}")
        if node["parent_id"] is not None and node["parent_id"] not in seen:
            raise InvalidTurns(f"message {i}: its parent must come before it")
        try:
            check_message(node["text"], max_chars)
        except ConversationError as e:
            raise type(e)(f"message {i}: {e}") from None
        seen.add(node["id"])
    if current is not None and current not in seen:
        raise InvalidTurns("the current message is not among the messages")


def check_imported_turns(turns: list[dict[str, str]], max_chars: int) -> list[dict[str, str]]:
    """Earlier turns ({"role": "user"|"assistant", "content"}) as {"role", "text"}, checked."""
    if len(turns) > MAX_IMPORTED_TURNS:
        raise InvalidTurns(f"at most {MAX_IMPORTED_TURNS} earlier turns, got {len(turns)}")
    checked = []
    for i, turn in enumerate(turns):
        if turn.get("role") not in IMPORTABLE_ROLES:
            raise InvalidTurns(f"turn {i}: the role is one of {list(IMPORTABLE_ROLES)}, got {turn.get('role')!r}")
        text = str(turn.get("content", "")).strip()
        check_message(text, max_chars)
        checked.append({"role": turn["role"], "text": text})
    return checked


def check_instructions(instructions: str, max_chars: int) -> str:
    instructions = instructions.strip()
    if len(instructions) > max_chars:
        raise MessageTooLong(f"system instructions have at most {max_chars} characters, these have {len(instructions)}")
    return instructions
