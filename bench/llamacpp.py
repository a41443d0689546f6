"""llama.cpp's `llama-server` for the serving benchmark: find it, build it, run it.

bench/engine.py compares our engine with llama.cpp on the same weights: the Q4_1 GGUF of
SmolLM2-135M-Instruct that the project's model install unpacks (chatbot/inference/default_model.py)
and then dequantises for the engine. llama.cpp is not a dependency of the project, so the
bench uses a server that is already there, in this order: the `LLAMA_SERVER` environment
variable, `llama-server` on the PATH, or the one this module built under
`.cache/llama.cpp/` (git-ignored). Building is an explicit step, never part of a test run:

    .venv/bin/python bench/llamacpp.py build     # a few minutes on 2 cores; reused after
    .venv/bin/python bench/llamacpp.py check     # start it on the GGUF and complete once

The build takes llama.cpp from the `llama-cpp-python` sdist on PyPI (it vendors llama.cpp at
`vendor/llama.cpp`) rather than from git, because package indexes are what this machine
can reach. It turns off everything that would fetch files at build or run time (the
server's prebuilt web UI, HTTPS) and builds for the instruction sets /proc/cpuinfo lists
(AVX2, and AVX-512 where there is some) instead of `-march=native`: these VMs may report AMX
but cannot execute it, and a native build dies of SIGILL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatbot.inference.default_model import extract_gguf, fetch_wheel  # noqa: E402
from chatbot.ops.launcher import Child, http_ok  # noqa: E402
from chatbot.ops.servers import free_port  # noqa: E402
from chatbot.runtime.config import REPO_ROOT  # noqa: E402

SDIST = "llama-cpp-python==0.3.36"
BUILD_ROOT = REPO_ROOT / ".cache" / "llama.cpp"
SOURCE = BUILD_ROOT / "src"
BUILT_SERVER = BUILD_ROOT / "build" / "bin" / "llama-server"
# the server for the bench; the other two are llama.cpp's own benchmarks, for cross-checks by hand
TARGETS = ("llama-server", "llama-bench", "llama-batched-bench")
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary, movable with LLAMA_SERVER
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # would download the web UI at build time
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_NATIVE=OFF",  # -march=native would enable AMX, which this VM cannot run
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
)


def isa_options(flags: set[str]) -> list[str]:
    """The instruction sets to build for, from the CPU's flags (/proc/cpuinfo): AVX2 with FMA
    and F16C, and the AVX-512 parts this CPU lists (a VM of the same kind may have none)."""
    return [f"-DGGML_{name}={'ON' if flag in flags else 'OFF'}" for name, flag in (
        ("AVX", "avx"), ("AVX2", "avx2"), ("FMA", "fma"), ("F16C", "f16c"),
        ("AVX512", "avx512f"), ("AVX512_VNNI", "avx512_vnni"), ("AVX512_BF16", "avx512_bf16"))]


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())
BUILD_HINT = "build it with `.venv/bin/python bench/llamacpp.py build` (a few minutes) or set LLAMA_SERVER"


def find_server() -> Path | None:
    """The llama-server binary to benchmark, or None when there is none."""
    if env := os.environ.get("LLAMA_SERVER"):
        path = Path(env)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"LLAMA_SERVER={env} is not an executable file")
        return path
    if on_path := shutil.which("llama-server"):
        return Path(on_path)
    return BUILT_SERVER if BUILT_SERVER.is_file() else None


def gguf_path() -> Path:
    """The Q4_1 GGUF that our engine's weights were converted from (checked by its hash)."""
    return extract_gguf(fetch_wheel())


def run_step(argv: list[str], timeout: float, cwd: Path | None = None) -> None:
    """One build command, its output shown as it goes; a failure or a hang stops the build."""
    print("+ " + " ".join(argv), flush=True)
    subprocess.run(argv, cwd=cwd, check=True, timeout=timeout)


def unpack_sdist(into: Path) -> None:
    """Download the sdist and keep only its vendored llama.cpp, as `into`."""
    with tempfile.TemporaryDirectory(prefix="llama-sdist-") as tmp:
        run_step([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", tmp],
                 timeout=900)
        (archive,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(archive) as tar:
            top = tar.getnames()[0].split("/")[0]
            prefix = f"{top}/vendor/llama.cpp/"
            tar.extractall(tmp, members=[m for m in tar.getmembers() if m.name.startswith(prefix)], filter="data")
        vendored = Path(tmp) / prefix
        # a git submodule's `.git` file pointing into the sdist's own .git: cmake's build-info
        # step would run git against it
        (vendored / ".git").unlink(missing_ok=True)
        shutil.rmtree(into, ignore_errors=True)
        shutil.move(vendored, into)


def build(force: bool = False) -> Path:
    """Build llama-server (and llama.cpp's benchmarks) under .cache/llama.cpp; reused when present."""
    if BUILT_SERVER.is_file() and not force:
        print(f"llama-server already built: {BUILT_SERVER}")
        return BUILT_SERVER
    if force or not (SOURCE / "CMakeLists.txt").is_file():
        BUILD_ROOT.mkdir(parents=True, exist_ok=True)
        unpack_sdist(SOURCE)
    build_dir = BUILD_ROOT / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    started = time.monotonic()
    run_step(["cmake", "-S", str(SOURCE), "-B", str(build_dir), *generator, *CMAKE_OPTIONS, *isa_options(cpu_flags())], timeout=600)
    run_step(["cmake", "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1),
              "--target", *TARGETS], timeout=3600)
    print(f"built {', '.join(TARGETS)} in {time.monotonic() - started:.0f} s: {build_dir / 'bin'}")
    return BUILT_SERVER


@contextlib.contextmanager
def serving(
    binary: Path, gguf: Path, parallel: int, slot_context: int, log: Path, threads: int = 2,
    ready_timeout: float = 120.0,
) -> Iterator[str]:
    """A llama-server on a free port with `parallel` slots of `slot_context` tokens each and
    continuous batching; yields its base URL once /health answers ok, stops it after."""
    port = free_port()
    argv = [
        str(binary), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "--parallel", str(parallel),
        "--cont-batching", "-c", str(parallel * slot_context), "--host", "127.0.0.1", "--port", str(port),
        "--no-webui",
    ]
    url = f"http://127.0.0.1:{port}"
    log.parent.mkdir(parents=True, exist_ok=True)
    child = Child("llama-server", argv, dict(os.environ), ready=lambda: http_ok(f"{url}/health"),
                  ready_timeout=ready_timeout, log=log)
    child.start()
    try:
        try:
            child.wait_ready()
        except (RuntimeError, TimeoutError):
            print(" ".join(argv), file=sys.stderr)
            print(log.read_text(errors="replace")[-4000:], file=sys.stderr)
            raise
        yield url
    finally:
        child.stop()


def check(binary: Path) -> None:
    """Start the server on the GGUF and have it complete one prompt: proves the binary runs
    on this CPU (an AMX build would die of SIGILL here) before anything is measured."""
    import httpx

    with tempfile.TemporaryDirectory(prefix="llama-check-") as tmp, \
            serving(binary, gguf_path(), parallel=1, slot_context=512, log=Path(tmp) / "server.log") as url:
        prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        reply = httpx.post(f"{url}/completion", json={"prompt": prompt, "n_predict": 16, "temperature": 0},
                           timeout=60).json()
        print(json.dumps({"binary": str(binary), "content": reply["content"],
                          "predicted_per_second": reply["timings"]["predicted_per_second"]}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("build", "check", "where"))
    parser.add_argument("--force", action="store_true", help="build again from a fresh download")
    args = parser.parse_args()
    if args.action == "build":
        check(build(args.force))
        return 0
    binary = find_server()
    if binary is None:
        print(f"no llama-server found: {BUILD_HINT}", file=sys.stderr)
        return 1
    if args.action == "where":
        print(binary)
    else:
        check(binary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
