"""The kernels of a decode step on this CPU: PyTorch's 4-bit and int8 weight-only products,
a bf16 `linear` and the native int8 product (chatbot/inference/native_decode.cpp) on
SmolLM2's weight shapes, then a whole decode step of the real model at 1, 8 and 32
sequences, int8 and fp32 as the engine serves them (`fuse_projections`, `precision.apply`),
each through the native step and through model.py.
Every measurement runs on a thread that started no OpenMP pool before (as the engine's
does). Run: `.venv/bin/python bench/kernels.py` (about 3 minutes on 2 cores);
docs/benchmarks.md, "Kernels measured for a decode step", says what the figures showed.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatbot.inference import native, precision  # noqa: E402
from chatbot.inference.default_model import MODEL_REPOSITORY  # noqa: E402
from chatbot.inference.engine import in_passing_thread  # noqa: E402
from chatbot.inference.kv_cache import KVCache  # noqa: E402
from chatbot.inference.model import LlamaForCausalLM  # noqa: E402

GROUP = 32  # 4-bit groups: the layout of Q4_1
SHAPES = {"576x576 (q, o)": (576, 576), "1536x576 (gate, up)": (1536, 576),
          "576x1536 (down)": (576, 1536), "49152x576 (lm_head)": (49152, 576)}
ROWS = (1, 8, 32)


def per_call_us(func: Callable[[], Any], calls: int) -> float:
    for _ in range(max(3, calls // 10)):
        func()
    started = time.perf_counter()
    for _ in range(calls):
        func()
    return (time.perf_counter() - started) / calls * 1e6


def int4_pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit groups of GROUP along the input: (packed weight, scales and zeros)
    as `_weight_int4pack_mm_for_cpu` takes them (w = (q - 8) * scale + zero)."""
    n, k = w.shape
    groups = w.reshape(n, k // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    scales_zeros = torch.stack([scale, low + 8 * scale], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros


def products() -> None:
    print("Weight-only products, microseconds per call (bf16 activations)")
    print(f"{'weight':<22} {'rows':>4} | {'int4':>9} {'int8':>9} {'bf16 linear':>12} {'native int8':>12}")
    native_here = native.available()
    empty = torch.empty(0)
    torch.manual_seed(0)
    for label, (n, k) in SHAPES.items():
        w = torch.randn(n, k) * 0.05
        packed, scales_zeros = int4_pack(w)
        scales = w.abs().amax(1) / 127
        q8 = torch.round(w / scales[:, None]).to(torch.int8)
        scales8, wb = scales.to(torch.bfloat16), w.to(torch.bfloat16)
        calls = 20 if n > 10_000 else 200
        for rows in ROWS:
            x = torch.randn(rows, k).to(torch.bfloat16)
            int4 = per_call_us(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_zeros), calls)
            int8 = per_call_us(lambda: torch.ops.aten._weight_int8pack_mm(x, q8, scales8), calls)
            bf16 = per_call_us(lambda: torch.nn.functional.linear(x, wb), calls)
            mine = float("nan")
            if native_here:  # fp32 activations, the weights as the decoder holds them
                q8_native = native.pack_int8(q8) if torch.ops.chatbot.int8_activations() else q8
                xf, sf = x.float(), scales.float()
                mine = per_call_us(lambda: torch.ops.chatbot.linear(xf, q8_native, sf, empty), calls)
            print(f"{label:<22} {rows:>4} | {int4:>9.1f} {int8:>9.1f} {bf16:>12.1f} {mine:>12.1f}", flush=True)


def load(precision_name: str) -> tuple[LlamaForCausalLM, KVCache]:
    """The model as the engine serves it: projections fused, at `precision_name`."""
    model = LlamaForCausalLM.from_pretrained(MODEL_REPOSITORY / "chat" / "1" / "smollm2").fuse_projections()
    model = precision.apply(model, precision_name)
    return model.eval(), KVCache(model.config, max(ROWS), 512, "cpu", torch.float32)


def decode_steps() -> None:
    """A whole decode step at each precision, through the native step (native.py) and
    through model.py, alternated in two passes."""
    print("\nA decode step of SmolLM2-135M at position 200, ms (two passes)")
    variants = ("int8 native", "int8 model.py", "fp32 native", "fp32 model.py")
    figures: dict[tuple[str, int], list[float]] = {}
    for _ in range(2):
        for variant in variants:
            name, path = variant.split()

            def prepared() -> tuple[LlamaForCausalLM, KVCache, native.NativeDecoder | None]:
                model, cache = load(name)  # packing the weights is tensor work too: not on this thread
                return model, cache, native.decoder_for(model, cache.data) if path == "native" else None

            model, cache, decoder = in_passing_thread(prepared)
            if path == "native" and decoder is None:
                print(f"{variant}: no native decode step here (python -m chatbot.inference.native build)")
                continue

            def run() -> None:
                with torch.inference_mode():
                    for rows in ROWS:
                        ids = torch.randint(0, 1000, (rows, 1))
                        positions = torch.full((rows, 1), 200)
                        slots = torch.arange(rows)
                        if decoder is not None:
                            step = per_call_us(lambda: decoder(ids, positions, slots), 20 if rows == 1 else 8)
                        else:
                            step = per_call_us(lambda: model(ids, positions, cache, slots), 20 if rows == 1 else 8)
                        figures.setdefault((variant, rows), []).append(step / 1000)

            thread = threading.Thread(target=run)  # no OpenMP pool of its own yet, as the engine's
            thread.start()
            thread.join()
    print(f"{'sequences':>9} | " + " | ".join(f"{v:>14}" for v in variants))
    for rows in ROWS:
        cells = [" / ".join(f"{t:.1f}" for t in figures.get((v, rows), [])) or "-" for v in variants]
        print(f"{rows:>9} | " + " | ".join(f"{c:>14}" for c in cells), flush=True)


if __name__ == "__main__":
    threading.Thread(target=products).start()  # its own thread: see the module notes
    for t in threading.enumerate():
        if t is not threading.main_thread():
            t.join()
    decode_steps()
