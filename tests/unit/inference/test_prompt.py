"""The prompt builder fits conversations into the served model's context window (the
engine's `max_seq_len` of config.pbtxt, 2,048 tokens, not SmolLM2's own 8,192)."""

from __future__ import annotations

import pytest

from chatbot.inference.prompt import (
    MAX_PROMPT_CHARS,
    PromptBuilder,
    model_dir,
    trim_history,
)
from chatbot.ops.servers import MODEL_REPOSITORY


def conversation(exchanges: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You are a helpful, friendly assistant."}]
    for i in range(exchanges):
        messages += [
            {"role": "user", "content": f"Tell me something about the number {i}, please."},
            {"role": "assistant", "content": f"The number {i} is a fine number with many friends."},
        ]
    return messages + [{"role": "user", "content": "And what about you?"}]


def test_the_builder_reads_the_newest_version_of_the_model() -> None:
    assert model_dir(MODEL_REPOSITORY, "chat") == MODEL_REPOSITORY / "chat" / "1" / "smollm2"
    assert PromptBuilder(MODEL_REPOSITORY).info("chat").context == 2048


def test_a_short_conversation_is_left_alone() -> None:
    messages = conversation(2)
    assert PromptBuilder(MODEL_REPOSITORY).fit("chat", messages, max_tokens=96) == messages


def test_a_long_conversation_loses_its_oldest_exchanges_until_it_fits() -> None:
    builder = PromptBuilder(MODEL_REPOSITORY)
    messages = conversation(120)
    assert builder.count("chat", messages) > 2048
    fitted = builder.fit("chat", messages, max_tokens=96)
    assert builder.count("chat", fitted) <= 2048 - 96
    assert fitted[0] == messages[0] and fitted[-1] == messages[-1]
    assert fitted[1]["role"] == "user"
    assert fitted[1:] == messages[-(len(fitted) - 1):]  # a suffix: the newest turns, in order


def test_a_pinned_version_resolves_to_its_own_folder() -> None:
    assert model_dir(MODEL_REPOSITORY, "chat/1") == MODEL_REPOSITORY / "chat" / "1" / "smollm2"


def test_a_model_name_that_is_not_in_the_repository_never_becomes_a_path() -> None:
    from chatbot.inference.prompt import UnknownModel

    for bad in ("../../etc/passwd", "chat/../../etc", "chat/99", "nosuch", "chat/x"):
        with pytest.raises(UnknownModel, match="no model"):
            model_dir(MODEL_REPOSITORY, bad)


def test_trimming_keeps_the_system_prompt_and_the_newest_turns() -> None:
    messages = [{"role": "system", "content": "s" * 10}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"{i}" * 100} for i in range(10)
    ]
    trimmed = trim_history(messages, max_chars=350)
    assert trimmed[0] == messages[0]
    assert trimmed[1:] == messages[-3:]
    # the newest turn is kept even when it alone is over the budget
    assert trim_history(messages, max_chars=5)[1:] == messages[-1:]


def test_fitting_cuts_by_characters_before_it_tokenizes() -> None:
    """A conversation far over the character cut is never tokenized whole: `fit` counts
    only what `trim_history` kept, and keeps the newest turns of it."""
    builder = PromptBuilder(MODEL_REPOSITORY)
    messages = conversation(3000)  # about 300,000 characters
    counted: list[int] = []
    count = builder.count
    builder.count = lambda model, ms: counted.append(sum(len(m["content"]) for m in ms)) or count(model, ms)  # type: ignore[method-assign]
    fitted = builder.fit("chat", messages, max_tokens=96)
    assert counted and max(counted) <= MAX_PROMPT_CHARS + len(messages[-1]["content"])
    assert fitted[0] == messages[0] and fitted[1:] == messages[-(len(fitted) - 1):]
