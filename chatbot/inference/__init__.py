"""The language model: a Llama decoder, its chat tokenizer, sampling and the engine.

Public API (used by the Triton model `triton_models/chat` and the tests):
- `LlamaForCausalLM`                                      (model.py)
- `LlamaConfig`                                           (llama_config.py)
- `KVCache`                                               (kv_cache.py)
- `ChatTokenizer`, `StreamDecoder`                        (tokenizer.py)
- `SamplingParams`                                        (generate.py)
- `Engine`                                                (engine.py)
- `EngineEvent`, `RequestHandle`, `PromptTooLongError`,
  `validate_messages`, `generate_text`                    (request.py)
Training of the demo model lives in `chatbot.training.train` (not imported here).
"""

from __future__ import annotations

import importlib
from typing import Any

# Names resolve on first use (PEP 562), so a process that needs only the tokenizer (the
# worker's prompt builder) does not load torch and the model code.
_HOMES = {
    "Engine": "engine", "EngineEvent": "request", "PromptTooLongError": "request", "RequestHandle": "request",
    "generate_text": "request", "validate_messages": "request", "SamplingParams": "generate",
    "KVCache": "kv_cache", "LlamaConfig": "llama_config", "LlamaForCausalLM": "model",
    "ChatTokenizer": "tokenizer", "StreamDecoder": "tokenizer",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'chatbot.inference' has no attribute {name!r}")
    return getattr(importlib.import_module(f"chatbot.inference.{_HOMES[name]}"), name)
