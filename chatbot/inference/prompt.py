"""The prompt builder: fits a conversation into the model's context window.

Where a prompt is made, in order (one place each):
- domain/persona.py `system_prompt`: the persona's prompt and the conversation's own
  instructions (also used when a message is sent, to refuse one that can never fit);
- domain/app_replies.py `reply_job`: that system prompt, then the turns of the reply's branch;
- here, `PromptBuilder.fit`: the newest turns that fit. A cheap cut by characters first
  (`trim_history`: a long conversation is never tokenized whole), then the rendered chat
  template is tokenized with the model's own tokenizer (read from the Triton model
  repository) and the oldest turns go until the prompt plus the reply's token budget fits;
- the engine renders and tokenizes exactly that (`ChatTokenizer.prompt_ids`), and refuses a
  prompt that leaves no room for a reply.
The system prompt and the newest user message always stay; if those alone do not fit, the
model rejects the request with a clear error.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from chatbot.inference.repository import models, parameter
from chatbot.inference.tokenizer import ChatTokenizer

MAX_PROMPT_CHARS = 24_000  # the cheap cut before tokenizing


def trim_history(messages: list[dict[str, str]], max_chars: int = MAX_PROMPT_CHARS) -> list[dict[str, str]]:
    """Keep the system prompt and the newest turns that fit in `max_chars` (the newest one
    always)."""
    system, turns = messages[:1], messages[1:]
    kept: list[dict[str, str]] = []
    used = len(system[0]["content"]) if system else 0
    for turn in reversed(turns):
        used += len(turn["content"])
        if kept and used > max_chars:
            break
        kept.append(turn)
    return system + kept[::-1]


@dataclass
class ModelInfo:
    tokenizer: ChatTokenizer
    context: int


class UnknownModel(ValueError):
    """A model name that is not one of the repository's (a persona written before names
    were checked): never turned into a path."""


def model_dir(repository: Path, model: str) -> Path:
    """The HF-layout weights of `model` ("name", the newest version, or "name/version"),
    found through the `model_dir` parameter of its config.pbtxt."""
    name, _, pinned = model.partition("/")
    if name not in models(repository) or (pinned and not (pinned.isdigit() and (repository / name / pinned).is_dir())):
        raise UnknownModel(f"no model {model!r} in the model repository")
    root = repository / name
    versions = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True)
    assert versions, f"model {name!r} has no version folders in {root}"
    version = pinned or str(versions[0])
    path = Path(parameter(repository, name, "model_dir", "demo"))
    return path if path.is_absolute() else root / version / path


def context_parameter(repository: Path, model: str) -> int:
    """The `max_seq_len` parameter of the model's config.pbtxt (the engine's context
    window; 0 when it takes the checkpoint's own)."""
    value = parameter(repository, model.partition("/")[0], "max_seq_len", "0")
    return int(value) if value.isdigit() else 0


class PromptBuilder:
    MAX_MODELS = 8  # tokenizers kept: names are checked against the repository, versions accumulate

    def __init__(self, repository: Path) -> None:
        self.repository = repository
        self.models: OrderedDict[str, ModelInfo] = OrderedDict()

    def info(self, model: str) -> ModelInfo:
        if model in self.models:
            self.models.move_to_end(model)
            return self.models[model]
        path = model_dir(self.repository, model)
        context = int(json.loads((path / "config.json").read_text())["max_position_embeddings"])
        window = context_parameter(self.repository, model)
        info = self.models[model] = ModelInfo(ChatTokenizer.from_pretrained(path), min(context, window or context))
        while len(self.models) > self.MAX_MODELS:
            self.models.popitem(last=False)
        return info

    def window(self, model: str) -> int:
        return self.info(model).context

    def count(self, model: str, messages: list[dict[str, str]]) -> int:
        return len(self.info(model).tokenizer.prompt_ids(messages))

    def fit(self, model: str, messages: list[dict[str, str]], max_tokens: int) -> list[dict[str, str]]:
        """The system prompt and the newest turns of `messages` that fit with a reply of
        `max_tokens`: cut by characters, then whole exchanges dropped, oldest first."""
        budget = self.info(model).context - max_tokens
        messages = trim_history(messages)
        system, turns = messages[:1], messages[1:]
        while len(turns) > 1 and self.count(model, system + turns) > budget:
            # drop a whole exchange where possible, so the history starts with a user turn
            turns = turns[2:] if len(turns) > 2 and turns[1]["role"] == "assistant" else turns[1:]
        return system + turns
