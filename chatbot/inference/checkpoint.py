"""What a Hugging Face checkpoint folder says besides its weights, read without torch.

Design notes
- `UnsupportedCheckpoint` is the one exception every loader raises for a folder we will
  not serve: an architecture we do not implement, a config key that changes the math
  in a way we do not reproduce, tensors that do not fit, a tokenizer with no chat
  template. It is a `ValueError` (the caller handed us bad input), never an `assert`,
  so it survives `python -O`. It lives here, not in model.py, because the tokenizer
  raises it too and must stay importable without torch (the worker's prompt builder
  loads only the tokenizer); model.py re-exports it.
- `sampling_defaults` reads the checkpoint author's recommended sampling settings from
  `generation_config.json`, like vLLM's "generation config" defaults: only the keys
  the file actually states (transformers' implicit `top_k=50` is not an author's
  recommendation), and `do_sample: false` means greedy, i.e. temperature 0. The keys
  match `SamplingParams` (temperature, top_p, top_k, with top_k 0 = no filter); a
  request's own values win over these, which win over the server's defaults.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class UnsupportedCheckpoint(ValueError):
    """A checkpoint this package cannot serve faithfully; the message says what is missing."""


def sampling_defaults(model_dir: str | Path) -> dict[str, float | int]:
    """temperature / top_p / top_k recommended by `generation_config.json` ({} if none).

    Greedy checkpoints (`do_sample: false`) give {"temperature": 0.0}. Values that no
    sampler accepts raise `UnsupportedCheckpoint` rather than being passed on.
    """
    path = Path(model_dir) / "generation_config.json"
    if not path.exists():
        return {}
    try:
        cfg: Any = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsupportedCheckpoint(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise UnsupportedCheckpoint(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("do_sample") is False:
        return {"temperature": 0.0}
    out: dict[str, float | int] = {}
    temperature, top_p, top_k = cfg.get("temperature"), cfg.get("top_p"), cfg.get("top_k")
    if temperature is not None:
        if not _is_number(temperature) or not temperature >= 0:
            raise UnsupportedCheckpoint(f"{path}: temperature must be a number >= 0, got {temperature!r}")
        out["temperature"] = float(temperature)
    if top_p is not None:
        if not _is_number(top_p) or not 0 < top_p <= 1:
            raise UnsupportedCheckpoint(f"{path}: top_p must be in (0, 1], got {top_p!r}")
        out["top_p"] = float(top_p)
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise UnsupportedCheckpoint(f"{path}: top_k must be an integer >= 0, got {top_k!r}")
        out["top_k"] = top_k
    return out


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
