"""The language model: a Llama decoder, its chat tokenizer, sampling and the engine.

Public API (used by the Triton model `triton_models/chat` and the tests):
- `LlamaConfig`, `LlamaForCausalLM`, `KVCache`            (model.py)
- `ChatTokenizer`, `StreamDecoder`                        (tokenizer.py)
- `SamplingParams`                                        (generate.py)
- `Engine`, `EngineEvent`, `RequestHandle`, `PromptTooLongError`,
  `validate_messages`, `generate_text`                    (engine.py)
Training of the demo model lives in `chatbot.llm.train` (not imported here).
"""

from __future__ import annotations

from chatbot.llm.engine import (
    Engine,
    EngineEvent,
    PromptTooLongError,
    RequestHandle,
    generate_text,
    validate_messages,
)
from chatbot.llm.generate import SamplingParams
from chatbot.llm.model import KVCache, LlamaConfig, LlamaForCausalLM
from chatbot.llm.tokenizer import ChatTokenizer, StreamDecoder

__all__ = [
    "ChatTokenizer",
    "Engine",
    "EngineEvent",
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "PromptTooLongError",
    "RequestHandle",
    "SamplingParams",
    "StreamDecoder",
    "generate_text",
    "validate_messages",
]
