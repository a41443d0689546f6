"""The engine's decode speed with the model loaded on the main thread, as before, against
`Engine.from_pretrained`, which loads it in a thread that exits first (chatbot/inference/engine.py,
"Threads and OpenMP"). Each variant runs in a fresh process of its own, twice, alternating,
on the installed `chat` model (SmolLM2-135M-Instruct, fp32, 2 threads): greedy, 64 new
tokens per stream, 1 and 8 streams at once, aggregate tokens/s including prefill.

Run: `.venv/bin/python bench/engine_thread.py`.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "triton_models" / "chat" / "1" / "smollm2"


def measure(mode: str) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    from chatbot.inference.engine import Engine
    from chatbot.inference.generate import SamplingParams
    from chatbot.inference.model import LlamaForCausalLM
    from chatbot.inference.tokenizer import ChatTokenizer

    torch.set_num_threads(2)
    if mode == "main-thread load":
        engine = Engine(LlamaForCausalLM.from_pretrained(MODEL), ChatTokenizer.from_pretrained(MODEL),
                        max_batch_size=8, max_seq_len=512)
    else:
        engine = Engine.from_pretrained(MODEL, max_batch_size=8, max_seq_len=512)
    engine.start()

    def rate(streams: int) -> float:
        done, finished = threading.Event(), []

        def on_event(event: object) -> None:
            if getattr(event, "final", False):
                finished.append((event.completion_tokens, time.perf_counter()))  # type: ignore[attr-defined]
                if len(finished) == streams:
                    done.set()

        started = time.perf_counter()
        for i in range(streams):
            engine.submit([{"role": "user", "content": f"Tell me a story about the sea, number {i}."}],
                          SamplingParams(temperature=0.0, max_tokens=64, min_tokens=64), on_event)
        assert done.wait(300), "the engine did not finish in 300 s"
        return sum(n for n, _ in finished) / (max(t for _, t in finished) - started)

    rate(1)  # warm-up
    print(f"{mode:>22} | {rate(1):>9.1f} | {rate(8):>10.1f}", flush=True)
    engine.stop()


def main() -> None:
    if len(sys.argv) > 1:
        measure(sys.argv[1])
        return
    print(f"{'':>22} | {'1 stream':>9} | {'8 streams':>10}   (tokens/s, 64 new tokens each)")
    for _ in range(2):
        for mode in ("main-thread load", "from_pretrained"):
            subprocess.run([sys.executable, __file__, mode], check=True, timeout=600)


if __name__ == "__main__":
    main()
