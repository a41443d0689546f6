"""Titles written by the model after a conversation's first reply.

When the first reply is recorded, the conversation is titled at once by rule (its first
message, `domain.conversation_rules.make_title`), so the chat list never waits on the model. The
worker then asks the same Triton model, greedily and for a few tokens, for a title of the
first message, shown three examples first (SmolLM2-135M, asked plainly, answers the
question instead), and records it (`Titled`, naming the model) unless the user renamed the chat
meanwhile. A small model often answers with a sentence instead of a title, so what it
writes is kept only if it looks like a title (`clean_title`); otherwise, and whenever the
request fails or takes too long, the rule's title stays.
"""

from __future__ import annotations

import re

TITLE_TOKENS = 16  # a title that needs more is not a title
TITLE_TIMEOUT_S = 30.0
MAX_WORDS = 8
EXCERPT_CHARS = 600  # of the first message, in the request
SYSTEM = "You give each message a title of 2 to 5 words."
EXAMPLES = (
    ("How do I bake bread at home?", "Baking bread at home"),
    ("What is the tallest mountain in the world?", "The tallest mountain"),
    ("Can you help me write a cover letter?", "Writing a cover letter"),
)
STATEMENT = re.compile(r"\b(is|are|was|were|am)\b", re.IGNORECASE)  # "12 times 7 is 80": an answer
PREFIX = re.compile(r"^\s*(title|conversation title|name)\s*:\s*", re.IGNORECASE)
QUOTES = "\"'“”‘’«»*_`#"


def title_request(first_message: str) -> list[dict[str, str]]:
    """The messages of the title request: the examples as earlier turns, then the first
    message, cut short."""
    messages = [{"role": "system", "content": SYSTEM}]
    for message, title in EXAMPLES:
        messages += [{"role": "user", "content": f"Message: {message}\nTitle:"}, {"role": "assistant", "content": title}]
    return messages + [{"role": "user", "content": f"Message: {first_message.strip()[:EXCERPT_CHARS]}\nTitle:"}]


def clean_title(text: str, finish_reason: str, first_message: str) -> str | None:
    """The title in what the model wrote, or None when it is not one: cut off by the token
    limit, empty, several lines, longer than MAX_WORDS words, a sentence (ends with . ? or !,
    holds one that does, or states something with "is", "are"...), or the first message
    repeated."""
    if finish_reason != "stop":
        return None
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) != 1:
        return None
    title = PREFIX.sub("", lines[0]).strip().strip(QUOTES).strip()
    words = title.split()
    if not words or len(words) > MAX_WORDS:
        return None
    if title[-1] in ".?!" or re.search(r"[.?!]\s", title) or STATEMENT.search(title):
        return None
    if title.casefold() == first_message.strip().casefold().rstrip(".?!"):
        return None
    return " ".join(words)
