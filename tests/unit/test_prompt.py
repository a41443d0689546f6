"""The prompt builder fits conversations into the served model's context window (the
engine's `max_seq_len` of config.pbtxt, 2,048 tokens, not SmolLM2's own 8,192)."""

from __future__ import annotations

import pytest

from chatbot.inference.prompt import PromptBuilder, model_dir
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
