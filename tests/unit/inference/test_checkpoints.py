"""Which Hugging Face checkpoints we serve, checked against transformers, and which we refuse.

Every family we claim (Llama, Llama 3 rope scaling, linear rope scaling, Qwen2 with and
without a tied head, Mistral with a window that never bites) is built tiny and random by
transformers itself, saved by its `save_pretrained` (the transformers 5 layout: safetensors,
`rope_parameters`, Qwen2's `layer_types`), loaded by our `LlamaForCausalLM.from_pretrained`
and compared on (a) the logits of a random batch (fp32, atol 1e-4) and (b) 12 greedy tokens,
ours decoded through the KV cache as the engine does it, theirs from `generate`. HF runs
with `attn_implementation="eager"`: its explicit softmax, not the SDPA kernel we call.

The other half is refusal: a checkpoint we would compute differently from transformers must
raise `UnsupportedCheckpoint` at load, naming what is missing, and never be served. Config
dicts modelled on real `config.json` files check the families both ways without weights.

Everything is tiny (2 layers, hidden 64, vocab 300), CPU-only, and nothing is downloaded.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers.utils import logging as hf_logging

from chatbot.inference.checkpoint import UnsupportedCheckpoint, sampling_defaults
from chatbot.inference.kv_cache import KVCache
from chatbot.inference.llama_config import LlamaConfig
from chatbot.inference.model import LlamaForCausalLM
from chatbot.inference.tokenizer import CHATML_TEMPLATE, ChatTokenizer

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

REPO = Path(__file__).resolve().parents[3]
VOCAB = 300
ATOL = 1e-4
NEW_TOKENS = 12

TINY: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)
LLAMA3_ROPE: dict[str, Any] = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 16,  # the 48-token batch reaches the scaled band
}

# name -> (transformers config class, causal LM class, config kwargs on top of TINY)
Architecture = tuple[type[transformers.PretrainedConfig], type[transformers.PreTrainedModel], dict[str, Any]]
ARCHITECTURES: dict[str, Architecture] = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"tie_word_embeddings": False}),
    "llama 3 rope scaling": (
        transformers.LlamaConfig, transformers.LlamaForCausalLM,
        {"tie_word_embeddings": True, "rope_parameters": LLAMA3_ROPE},
    ),
    "llama linear rope scaling": (
        transformers.LlamaConfig, transformers.LlamaForCausalLM,
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
    ),
    "qwen2 untied": (
        transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
        {"tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
    ),
    "qwen2 tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "qwen2 with sliding window on no layer": (
        transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2},
    ),
    "mistral with window beyond the context": (
        transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": 4096, "head_dim": 32},
    ),
    "mistral without window": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
}


def hf_random_model(arch: str, seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    config_cls, model_cls, kw = ARCHITECTURES[arch]
    config = config_cls(**{**TINY, **kw, **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = model_cls(config)
    # HF's init (std 0.02, biases 0) gives near-uniform logits and zero biases: widen
    # everything but the norms, so a missing bias or wrong rotary table shows far above ATOL
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.2)
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_logits(model: transformers.PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def our_greedy_tokens(model: LlamaForCausalLM, prompt: torch.Tensor, new: int) -> list[int]:
    """Greedy decoding through the KV cache, as the engine runs it: prefill, then one token
    per forward at its absolute position."""
    cache = KVCache(model.config, num_slots=2, max_len=64)
    slot = torch.tensor([1])
    tokens: list[int] = []
    with torch.no_grad():
        logits = model(prompt, kv_cache=cache, slots=slot, last_only=True)
        for pos in range(prompt.shape[1], prompt.shape[1] + new):
            tokens.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[tokens[-1]]]), positions=torch.tensor([[pos]]), kv_cache=cache, slots=slot)
    return tokens


def hf_greedy_tokens(model: transformers.PreTrainedModel, prompt: torch.Tensor, new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    return [int(t) for t in out[0, prompt.shape[1] :]]


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def loaded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, LlamaForCausalLM, transformers.PreTrainedModel]:
    """(architecture, ours loaded from transformers' checkpoint, transformers' model)."""
    arch: str = request.param
    reference = hf_random_model(arch)
    folder = tmp_path_factory.mktemp("checkpoint")
    reference.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return arch, LlamaForCausalLM.from_pretrained(folder), reference


# ---- every family we claim: same logits, same greedy tokens ---------------------------------


def test_each_supported_family_loads_from_a_transformers_checkpoint_with_the_same_logits(
    loaded: tuple[str, LlamaForCausalLM, transformers.PreTrainedModel],
) -> None:
    _, ours, reference = loaded
    ids = random_ids(2, 48)
    with torch.no_grad():
        got = ours(ids)
    expected = hf_logits(reference, ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_each_supported_family_decodes_the_greedy_tokens_of_transformers_through_our_kv_cache(
    loaded: tuple[str, LlamaForCausalLM, transformers.PreTrainedModel],
) -> None:
    _, ours, reference = loaded
    prompt = random_ids(1, 10, seed=7)
    assert our_greedy_tokens(ours, prompt, NEW_TOKENS) == hf_greedy_tokens(reference, prompt, NEW_TOKENS)


def test_the_config_flags_of_each_family_match_its_transformers_modules(
    loaded: tuple[str, LlamaForCausalLM, transformers.PreTrainedModel],
) -> None:
    arch, ours, reference = loaded
    attn = ours.model.layers[0].self_attn
    ref_attn = reference.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert (getattr(attn, name).bias is None) == (getattr(ref_attn, name).bias is None), name
    assert ours.config.qkv_bias == arch.startswith("qwen2")
    tied = ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    assert tied == reference.config.tie_word_embeddings


def test_our_save_of_a_qwen2_checkpoint_loads_in_transformers_as_qwen2_with_the_same_logits(tmp_path: Path) -> None:
    reference = hf_random_model("qwen2 untied", seed=2)
    reference.save_pretrained(tmp_path / "hf")
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (saved["model_type"], saved["architectures"]) == ("qwen2", ["Qwen2ForCausalLM"])
    assert "qkv_bias" not in saved  # derived from model_type, not a transformers key
    again = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ours", attn_implementation="eager", dtype=torch.float32,
    ).eval()
    assert isinstance(again, transformers.Qwen2ForCausalLM)
    ids = random_ids(2, 32, seed=3)
    torch.testing.assert_close(hf_logits(again, ids), hf_logits(reference, ids), atol=ATOL, rtol=0)


def test_a_fresh_config_with_biases_on_qkv_only_saves_as_qwen2_and_a_contradiction_is_an_error() -> None:
    assert LlamaConfig(qkv_bias=True).to_dict()["model_type"] == "qwen2"
    assert LlamaConfig().to_dict()["architectures"] == ["LlamaForCausalLM"]
    with pytest.raises(ValueError, match="qwen2"):
        LlamaConfig(qkv_bias=True, extra={"model_type": "llama"}).to_dict()


# ---- real config.json files, without weights --------------------------------------------------

QWEN25_INSTRUCT: dict[str, Any] = {  # Qwen/Qwen2.5-0.5B-Instruct, transformers 4.x layout
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
    "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
MISTRAL_V03: dict[str, Any] = {  # mistralai/Mistral-7B-Instruct-v0.3
    "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32768,
}
LLAMA32_INSTRUCT: dict[str, Any] = {  # meta-llama/Llama-3.2-1B-Instruct
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": True, "vocab_size": 128256,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
GEMMA2: dict[str, Any] = {  # google/gemma-2-2b-it, abridged
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "intermediate_size": 9216,
    "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4, "head_dim": 256,
    "max_position_embeddings": 8192, "vocab_size": 256000, "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 256, "sliding_window": 4096,
}


def test_real_qwen2_mistral_and_llama3_configs_are_accepted_with_the_flags_transformers_uses() -> None:
    qwen = LlamaConfig.from_dict(QWEN25_INSTRUCT)
    assert (qwen.qkv_bias, qwen.attention_bias, qwen.tie_word_embeddings, qwen.rope_theta) == (True, False, True, 1e6)
    mistral = LlamaConfig.from_dict(MISTRAL_V03)
    assert (mistral.qkv_bias, mistral.attention_bias, mistral.head_dim) == (False, False, 128)
    llama = LlamaConfig.from_dict(LLAMA32_INSTRUCT)
    assert llama.rope_scaling is not None and llama.rope_scaling["rope_type"] == "llama3"
    assert llama.eos_token_ids == [128001, 128008, 128009]
    for cfg in (qwen, mistral, llama):  # what we save is what we read back
        assert LlamaConfig.from_dict(cfg.to_dict()) == cfg


def test_the_served_smollm2_and_demo_folders_still_load_unchanged() -> None:
    for name in ("smollm2", "demo"):
        folder = REPO / "triton_models" / "chat" / "1" / name
        if not (folder / "config.json").is_file():
            pytest.skip(f"{folder} is not in this checkout")
        config = LlamaConfig.from_json(folder / "config.json")
        assert (config.qkv_bias, config.attention_bias, config.to_dict()["model_type"]) == (False, False, "llama")
        assert ChatTokenizer.from_pretrained(folder).chat_template


def refusal(d: dict[str, Any], *overrides: tuple[str, Any]) -> dict[str, Any]:
    out = dict(d)
    for key, value in overrides:
        out[key] = value
    return out


REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "gemma 2": (GEMMA2, "model_type 'gemma2' is not implemented"),
    "phi 3": (refusal(MISTRAL_V03, ("model_type", "phi3"), ("architectures", ["Phi3ForCausalLM"])), "'phi3'"),
    "gpt 2": ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 768}, "'gpt2'"),
    "a llama with a classification head": (
        refusal(LLAMA32_INSTRUCT, ("architectures", ["LlamaForSequenceClassification"])), "LlamaForSequenceClassification",
    ),
    "no model_type and an unknown architecture": (
        {k: v for k, v in MISTRAL_V03.items() if k != "model_type"} | {"architectures": ["FalconForCausalLM"]},
        "FalconForCausalLM",
    ),
    "gelu": (refusal(LLAMA32_INSTRUCT, ("hidden_act", "gelu")), "hidden_act silu"),
    "yarn rope scaling": (
        refusal(QWEN25_INSTRUCT, ("rope_scaling", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})),
        "rope_scaling type 'yarn' is not implemented",
    ),
    "dynamic rope scaling in rope_parameters": (
        {k: v for k, v in MISTRAL_V03.items() if k != "rope_theta"}
        | {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0}},
        "'dynamic'",
    ),
    "llama3 rope scaling without its original context": (
        refusal(LLAMA32_INSTRUCT, ("rope_scaling", {"rope_type": "llama3", "factor": 32.0})),
        "lacks original_max_position_embeddings",
    ),
    "a sliding window smaller than the context": (
        refusal(MISTRAL_V03, ("sliding_window", 4096)), "set max_position_embeddings to 4096",
    ),
    "a qwen2 window on its upper layers": (
        refusal(QWEN25_INSTRUCT, ("use_sliding_window", True), ("sliding_window", 4096)), "sliding-window attention",
    ),
    "soft-capped logits on a llama": (refusal(LLAMA32_INSTRUCT, ("final_logit_softcapping", 30.0)), "final_logit_softcapping=30.0"),
    "query_pre_attn_scalar": (refusal(LLAMA32_INSTRUCT, ("query_pre_attn_scalar", 128)), "query_pre_attn_scalar=128"),
    "partial rotary": (refusal(LLAMA32_INSTRUCT, ("partial_rotary_factor", 0.5)), "partial_rotary_factor=0.5"),
    "qk norm": (refusal(QWEN25_INSTRUCT, ("qk_norm", True)), "qk_norm=True"),
    "a config without hidden_size": (
        {k: v for k, v in LLAMA32_INSTRUCT.items() if k != "hidden_size"}, "config.json lacks hidden_size",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_config_we_would_compute_differently_from_transformers_is_refused_naming_what_is_missing(case: str) -> None:
    config, message = REFUSED[case]
    with pytest.raises(UnsupportedCheckpoint, match=re.escape(message)):
        LlamaConfig.from_dict(config)


def test_a_mistral_checkpoint_whose_window_is_smaller_than_its_context_is_refused_at_load(tmp_path: Path) -> None:
    hf_random_model("mistral without window", sliding_window=128).save_pretrained(tmp_path)  # context 256
    with pytest.raises(UnsupportedCheckpoint, match="sliding_window 128 < max_position_embeddings 256"):
        LlamaForCausalLM.from_pretrained(tmp_path)


def test_a_yarn_checkpoint_from_transformers_is_refused_at_load(tmp_path: Path) -> None:
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    hf_random_model("qwen2 untied", rope_parameters=yarn).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedCheckpoint, match="'yarn'"):
        LlamaForCausalLM.from_pretrained(tmp_path)


# ---- weights that do not fit the config --------------------------------------------------------


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    hf_random_model("llama", seed=5).save_pretrained(folder)
    return folder


def rewrite_weights(source: Path, target: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text((source / "config.json").read_text())
    state = load_file(str(source / "model.safetensors"))
    edit(state)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def test_a_checkpoint_with_a_missing_tensor_is_refused_naming_the_tensor(llama_folder: Path, tmp_path: Path) -> None:
    folder = rewrite_weights(llama_folder, tmp_path, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(UnsupportedCheckpoint, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        LlamaForCausalLM.from_pretrained(folder)


def test_a_checkpoint_with_an_unexpected_tensor_is_refused_naming_the_tensor(llama_folder: Path, tmp_path: Path) -> None:
    def add_bias(state: dict[str, torch.Tensor]) -> None:  # a Qwen2 bias under a llama config
        state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)

    folder = rewrite_weights(llama_folder, tmp_path, add_bias)
    with pytest.raises(UnsupportedCheckpoint, match=r"unexpected tensors: model\.layers\.0\.self_attn\.q_proj\.bias"):
        LlamaForCausalLM.from_pretrained(folder)


def test_a_checkpoint_with_a_tensor_of_the_wrong_shape_is_refused(llama_folder: Path, tmp_path: Path) -> None:
    def shrink(state: dict[str, torch.Tensor]) -> None:
        state["model.norm.weight"] = state["model.norm.weight"][:32].clone()

    folder = rewrite_weights(llama_folder, tmp_path, shrink)
    with pytest.raises(UnsupportedCheckpoint, match=r"wrong shape: model\.norm\.weight \(32,\) \(expected \(64,\)\)"):
        LlamaForCausalLM.from_pretrained(folder)


def test_an_untied_checkpoint_without_lm_head_is_refused_instead_of_left_uninitialised(
    llama_folder: Path, tmp_path: Path
) -> None:
    folder = rewrite_weights(llama_folder, tmp_path, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(UnsupportedCheckpoint, match="lm_head.weight"):
        LlamaForCausalLM.from_pretrained(folder)


def test_the_refusal_of_bad_weights_survives_python_dash_o(llama_folder: Path, tmp_path: Path) -> None:
    folder = rewrite_weights(llama_folder, tmp_path, lambda s: s.pop("model.norm.weight"))
    code = (
        "import sys\n"
        "assert False, 'asserts are on'\n"  # under -O this line is gone
        "from chatbot.inference.model import LlamaForCausalLM, UnsupportedCheckpoint\n"
        "try:\n"
        f"    LlamaForCausalLM.from_pretrained({str(folder)!r})\n"
        "except UnsupportedCheckpoint as e:\n"
        "    print('refused:', e)\n"
        "    sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    run = subprocess.run([sys.executable, "-O", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "model.norm.weight" in run.stdout


def test_only_the_shards_of_the_index_are_read_not_a_consolidated_file_beside_them(
    llama_folder: Path, tmp_path: Path
) -> None:
    state = load_file(str(llama_folder / "model.safetensors"))
    (tmp_path / "config.json").write_text((llama_folder / "config.json").read_text())
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / shard), metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    # Mistral repositories ship the same weights in their own naming next to the HF shards
    save_file({"layers.0.attention.wq.weight": torch.zeros(4, 4)}, str(tmp_path / "consolidated.safetensors"))
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(ours.model.norm.weight, state["model.norm.weight"])


def test_a_folder_with_only_pytorch_bin_weights_is_refused_naming_them(llama_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((llama_folder / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UnsupportedCheckpoint, match="pytorch_model.bin"):
        LlamaForCausalLM.from_pretrained(tmp_path)


# ---- the chat template -----------------------------------------------------------------------

OTHER_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
HELLO = [{"role": "user", "content": "hello"}]


def write_tokenizer_folder(folder: Path, tokenizer_config: dict[str, Any]) -> Path:
    words = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "hello"]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"eos_token": "<|im_end|>", **tokenizer_config}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def test_chat_template_jinja_takes_precedence_over_tokenizer_config(tmp_path: Path) -> None:
    folder = write_tokenizer_folder(tmp_path, {"chat_template": CHATML_TEMPLATE})
    (folder / "chat_template.jinja").write_text(OTHER_TEMPLATE)
    assert ChatTokenizer.from_pretrained(folder).apply_chat_template(HELLO) == "[user] hello\n"


def test_the_template_of_tokenizer_config_is_used_when_there_is_no_jinja_file(tmp_path: Path) -> None:
    folder = write_tokenizer_folder(tmp_path, {"chat_template": OTHER_TEMPLATE})
    assert ChatTokenizer.from_pretrained(folder).chat_template == OTHER_TEMPLATE


def test_a_list_of_named_templates_gives_the_one_named_default(tmp_path: Path) -> None:
    templates = [{"name": "tool_use", "template": CHATML_TEMPLATE}, {"name": "default", "template": OTHER_TEMPLATE}]
    folder = write_tokenizer_folder(tmp_path, {"chat_template": templates})
    assert ChatTokenizer.from_pretrained(folder).chat_template == OTHER_TEMPLATE


def test_a_list_of_named_templates_without_a_default_is_refused(tmp_path: Path) -> None:
    folder = write_tokenizer_folder(tmp_path, {"chat_template": [{"name": "tool_use", "template": OTHER_TEMPLATE}]})
    with pytest.raises(UnsupportedCheckpoint, match="none named 'default'"):
        ChatTokenizer.from_pretrained(folder)


def test_a_tokenizer_folder_without_any_chat_template_is_refused(tmp_path: Path) -> None:
    folder = write_tokenizer_folder(tmp_path, {})
    with pytest.raises(UnsupportedCheckpoint, match="has no chat template"):
        ChatTokenizer.from_pretrained(folder)


def test_a_tokenizer_saved_by_transformers_5_renders_the_prompt_transformers_renders(tmp_path: Path) -> None:
    source = write_tokenizer_folder(tmp_path / "source", {})
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(source / "tokenizer.json"), eos_token="<|im_end|>")
    hf.chat_template = CHATML_TEMPLATE
    hf.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "chat_template.jinja").is_file()  # the transformers 5 layout
    ours = ChatTokenizer.from_pretrained(tmp_path / "saved")
    expected = hf.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(HELLO) == expected


# ---- generation_config.json --------------------------------------------------------------------


def test_sampling_defaults_are_those_generation_config_states(tmp_path: Path) -> None:
    # as Qwen2.5-Instruct ships it, written by transformers itself
    transformers.GenerationConfig(
        do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, eos_token_id=[151645, 151643],
    ).save_pretrained(tmp_path)
    assert sampling_defaults(tmp_path) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20}


def test_sampling_defaults_of_a_greedy_generation_config_are_temperature_zero(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert sampling_defaults(tmp_path) == {"temperature": 0.0}


def test_sampling_defaults_are_empty_without_a_generation_config_or_sampling_keys(tmp_path: Path) -> None:
    assert sampling_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    assert sampling_defaults(tmp_path) == {}


def test_sampling_defaults_refuse_values_no_sampler_accepts(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_p": 1.5}))
    with pytest.raises(UnsupportedCheckpoint, match="top_p"):
        sampling_defaults(tmp_path)
