"""What the model writes is kept as a title only when it looks like one (workers/titles.py)."""

from __future__ import annotations

import pytest

from workers.titles import EXCERPT_CHARS, clean_title, title_request

FIRST = "What do penguins eat in winter?"


@pytest.mark.parametrize("written, title", [
    ("Penguins: The Winter's Unyielding Meal", "Penguins: The Winter's Unyielding Meal"),
    ('"Penguin winter diet"', "Penguin winter diet"),
    ("Title: Penguin   winter diet\n", "Penguin winter diet"),
    ("**Penguin Diets**", "Penguin Diets"),
    ("Fixing a flat bicycle tyre", "Fixing a flat bicycle tyre"),
])
def test_a_title_is_kept_cleaned(written: str, title: str) -> None:
    assert clean_title(written, "stop", FIRST) == title


@pytest.mark.parametrize("written, finish", [
    ("Day 1: Explore Alfama and the castle. Day 2: Be", "length"),  # cut off by the token limit
    ("Penguin winter diet", "length"),
    ("The capital of France is Paris.", "stop"),  # a sentence
    ("I'm ready to assist. What's on your mind?", "stop"),
    ("Lisbon, Portugal\nLisbon, Portugal", "stop"),  # several lines
    ("Penguins are carnivores and they eat fish krill and squid", "stop"),  # too long
    ("What do penguins eat in winter", "stop"),  # the question repeated
    ("  ", "stop"),
    ('""', "stop"),
    ("Great trip. Lisbon", "stop"),  # holds a sentence
    ("12 times 7 is 80", "stop"),  # an answer, not a title
])
def test_what_is_not_a_title_is_refused(written: str, finish: str) -> None:
    assert clean_title(written, finish, FIRST) is None


def test_the_request_shows_examples_then_the_message_cut_short() -> None:
    messages = title_request("  " + "a" * 5000)
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert messages[-1]["content"] == f"Message: {'a' * EXCERPT_CHARS}\nTitle:"
