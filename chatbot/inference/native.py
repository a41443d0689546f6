"""The decode step in C++ (native_decode.cpp): built once per CPU, used where it fits.

Design notes
- Why: a decode step of SmolLM2-135M in model.py is about 1,300 PyTorch operations, each
  dispatched from Python; at one sequence they cost as much as the products themselves.
  `torch.ops.chatbot.decode_step` does a whole step (every layer, the final norm, the
  lm_head) in one call, over raw fp32 buffers and int8 or fp32 weights. A step takes any
  rows (token, position, slot), so a short prefill is one step too: every prompt token a
  row, packed without pads (`prefill`; the engine uses it for every prefill of an int8
  model, and up to `PREFILL_MAX_TOKENS` for an fp32 one: `prefills`).
- int8 on a CPU with AVX512-VNNI: the products take int8 activations as well (blocks of 16
  inputs, one scale each, as llama.cpp's Q8 blocks) and multiply in int8; the weights are
  read from a copy packed in the order the product streams them (`pack_int8`). Quality is
  measured on the real model (tests/integration/test_precision.py). Elsewhere the int8
  weights are converted to fp32 in registers, with fp32 activations.
- Each row is computed as it would be alone: no sum depends on the other rows of a call,
  so a token's numbers do not change with what is decoded beside it, and a prefilled
  prompt's keys and values are bit for bit those of decoding it token by token.
- Built, never downloaded: `python -m chatbot.inference.native build` (run by `make
  install`) compiles the one source file with PyTorch's extension builder and the machine's
  g++, for this CPU (`-march=native`). The build goes to `.cache/native/<tag>/`, the tag
  made of the source, the torch version and the CPU's instruction-set flags, so a build for
  one CPU is never loaded on another (it could die of an illegal instruction), and a changed
  source is never served stale. Serving only loads a build that is there: a process never
  compiles on its own, and without a build the engine runs model.py and logs why.
- Which models: on a CPU, fp32 activations and an fp32 KV cache (precision fp32, or int8
  with fp32 around its products), projections fused (`fuse_projections`), sizes multiples
  of 16. Anything else (bf16, CUDA, LoRA-wrapped layers) gets `None` from `decoder_for`
  and runs model.py, which stays the reference: tests/unit/inference/test_native.py
  checks the two against each other.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from functools import cache
from pathlib import Path

import torch
from torch import nn

from chatbot.inference.precision import Int8Linear

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_decode.cpp")
BUILD_ROOT = Path(os.environ.get("CHATBOT_NATIVE_DIR", Path(__file__).resolve().parents[2] / ".cache" / "native"))
# -fopenmp: at::parallel_for is inline (ATen/ParallelOpenMP.h) and runs on one thread
# without it; the library then shares the libgomp.so.1 torch has loaded (same soname)
CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"]
# An fp32 model's prefills of at most this many tokens (all prompts of the chunk together)
# run natively, longer ones in model.py, whose batched products (MKL, oneDNN) are faster
# there. SmolLM2 on 2 cores, ms, native against model.py: int8 16 tokens 19 / 49, 64: 76 /
# 93, 2 x 64: 147 / 148, 128: 138 / 161, 512: 869 / 562; fp32 16: 54 / 102, 128: 326 / 313,
# 512: 1,510 / 915. (An int8 model's prefills all run natively: `NativeDecoder.prefills`.)
PREFILL_MAX_TOKENS = 128


def cpu_flags() -> list[str]:
    """The instruction-set flags /proc/cpuinfo lists for this CPU (empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(line.split(":", 1)[1].split())
    except OSError:
        pass
    return []


def build_tag() -> str:
    """What a build is valid for: this source, these flags, this torch, this CPU."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(CFLAGS + [torch.__version__, sys.platform] + cpu_flags()).encode())
    return h.hexdigest()[:16]


def _library(directory: Path) -> Path:
    return directory / "chatbot_native.so"


def build(verbose: bool = False) -> Path:
    """Compile native_decode.cpp for this CPU (15-20 s on 2 cores; nothing when built) and
    remove the builds of other sources; the library's path."""
    import shutil

    from torch.utils import cpp_extension

    directory = BUILD_ROOT / build_tag()
    directory.mkdir(parents=True, exist_ok=True)
    for old in BUILD_ROOT.iterdir():  # a process that loaded one keeps it mapped
        if old.is_dir() and old != directory:
            shutil.rmtree(old, ignore_errors=True)
    # the ninja of this environment's bin (pip's) where the system has none
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if not _library(directory).is_file():
        cpp_extension.load(
            name="chatbot_native", sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
            build_directory=str(directory), is_python_module=False, verbose=verbose,
        )
    return _library(directory)


@cache
def available() -> bool:
    """True once this CPU's build is loaded (never compiles: see the module notes)."""
    if hasattr(torch.ops.chatbot, "decode_step"):
        return True
    library = _library(BUILD_ROOT / build_tag())
    if not library.is_file():
        log.warning("no native decode step built for this CPU (%s): decoding runs in Python, slower; "
                    "build it with `python -m chatbot.inference.native build` (make install does)", library)
        return False
    try:
        torch.ops.load_library(str(library))
    except OSError as e:
        log.warning("the native decode step in %s did not load (%s): decoding runs in Python", library, e)
        return False
    return True


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 weights [n, k] as the VNNI product streams them: [n / 4, k / 64, 4, 64], so a
    step reads memory front to back (a copy: model.py's prefill keeps the plain layout)."""
    n, k = q.shape
    return q.reshape(n // 4, 4, k // 64, 64).permute(0, 2, 1, 3).contiguous()


def _product(module: nn.Module) -> list[torch.Tensor] | None:
    """(weight, scale, bias) as decode_step takes them, or None if it cannot run `module`."""
    empty = torch.empty(0)
    if getattr(module, "in_features", 1) % 16:  # whole vectors of 16 inputs (native_decode.cpp)
        return None
    if isinstance(module, Int8Linear):
        bias = empty if module.bias is None else module.bias.detach().float().contiguous()
        q = module.qweight
        if torch.ops.chatbot.int8_activations() and q.shape[0] % 4 == 0 and q.shape[1] % 64 == 0:
            q = pack_int8(q)
        return [q, module.scales.detach().float().contiguous(), bias]
    if type(module) is nn.Linear and module.weight.dtype == torch.float32:
        bias = empty if module.bias is None else module.bias.detach().contiguous()
        return [module.weight.detach().contiguous(), empty, bias]
    return None  # LoRA-wrapped, bf16, or anything else: model.py runs it


class NativeDecoder:
    """`decoder(ids, positions, slots)` -> [B, V] fp32 logits of one decode step, writing the
    step's keys and values into `cache` as model.py would; `prefill` reads prompts."""

    def __init__(self, model: nn.Module, cache: torch.Tensor, weights: list[torch.Tensor]) -> None:
        config = model.config
        self.cache = cache
        self.embed = model.model.embed_tokens.weight.detach()
        self.inv_freq = model.inv_freq.float().contiguous()
        self.weights = weights
        self.shape = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.eps = float(config.rms_norm_eps)
        self.int8 = any(w.dtype == torch.int8 for w in weights)

    def prefills(self, tokens: int) -> bool:
        """Whether a prefill of `tokens` (a chunk's prompts together) runs here: an int8
        model's always, since model.py's int8 numbers differ from these by more than float
        rounding and a retried reply must compute the same ones (precision.py); an fp32
        model's up to PREFILL_MAX_TOKENS, beyond which model.py is faster."""
        return self.int8 or tokens <= PREFILL_MAX_TOKENS

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        n_heads, n_kv, head_dim = self.shape
        return torch.ops.chatbot.decode_step(
            ids.reshape(-1), positions.reshape(-1), slots.reshape(-1), self.cache, self.embed, self.inv_freq,
            self.weights, n_heads, n_kv, head_dim, self.eps, torch.empty(0) if logit_rows is None else logit_rows,
        )

    def prefill(self, parts: list[tuple[list[int], int, int]]) -> torch.Tensor:
        """[len(parts), V] logits of the last token of each (token ids, first position, slot):
        every token one row of one step, packed without padding, each row attending to its
        slot's positions up to its own (native_decode.cpp), so a row's numbers are those of
        decoding its tokens one by one."""
        ids = torch.tensor([t for tokens, _, _ in parts for t in tokens])
        positions = torch.cat([torch.arange(start, start + len(tokens)) for tokens, start, _ in parts])
        slots = torch.cat([torch.full((len(tokens),), slot) for tokens, _, slot in parts])
        ends = torch.tensor([len(tokens) for tokens, _, _ in parts]).cumsum(0) - 1
        return self(ids, positions, slots, ends)


def decoder_for(model: nn.Module, cache: torch.Tensor) -> NativeDecoder | None:
    """A native decoder for `model` with this KV cache, or None where model.py must run it
    (the reasons in the module notes); fp32 weights are shared with the model, int8 ones
    packed into a copy where the CPU has VNNI (`pack_int8`)."""
    config = model.config
    embed = model.model.embed_tokens.weight
    if (embed.device.type != "cpu" or embed.dtype != torch.float32 or cache.dtype != torch.float32
            or not cache.is_contiguous() or config.head_dim % 16 or config.hidden_size % 16 or not available()):
        return None
    weights: list[torch.Tensor] = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_proj is None or mlp.gate_up_proj is None:
            return None
        parts = [_product(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        if any(p is None for p in parts):
            return None
        qkv, o, gate_up, down = parts
        weights += [layer.input_layernorm.weight.detach(), *qkv, *o,  # type: ignore[misc]
                    layer.post_attention_layernorm.weight.detach(), *gate_up, *down]  # type: ignore[misc]
    head = _product(model.lm_head)
    if head is None:
        return None
    weights += [model.model.norm.weight.detach(), *head]
    if any(w.dtype not in (torch.float32, torch.int8) or not w.is_contiguous() for w in weights):
        return None
    return NativeDecoder(model, cache, weights)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatbot.inference.native",
                                     description="build the native decode step for this CPU")
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        path = build(verbose=args.verbose)
    except (RuntimeError, OSError, ImportError) as e:  # no compiler, no ninja: Python decoding still works
        print(f"the native decode step was not built ({e}); decoding will run in Python", file=sys.stderr)
        return 1
    print(f"native decode step built: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
