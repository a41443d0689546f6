"""The Triton model repository as versions: what is on disk, what Triton has loaded, and
how a new version is written and loaded.

A model is a folder with `config.pbtxt` and numbered version folders. The weights of a
version sit in the folder its config's `model_dir` parameter names (relative to the
version folder, e.g. `chat/2/demo/`), next to the version's `model.py`. `chatbot train`
writes version N+1 into a hidden staging folder beside the others (Triton ignores names
that are not numbers) and renames it into place when it is complete, with its model card
(`model_card.json` for tools, `MODEL_CARD.md` for people).

`add_checkpoint` (`chatbot models add`) puts a user's own checkpoint in: a Hugging Face
folder, or a GGUF file converted into one. It becomes the next version of a model of that
name, or a new model (the config and `model.py` of the `chat` model, with its own weights
folder), once loading it proves that it can be served: the tokenizer with a chat template,
the architecture, every tensor in place. Nothing is written for a checkpoint that fails.

Triton runs with `--model-control-mode=explicit`. `load_versions` asks it to serve exactly
the given versions of a model by loading the model with its own `config.pbtxt` and the
`version_policy` replaced (`specific`): versions already loaded keep serving until their
replacements are ready, versions left out are unloaded once their requests finish.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"
_SKIP = {"__pycache__", CARD_JSON, CARD_MD}
MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}")  # a folder name, never a path
NEW_MODEL_WEIGHTS = "weights"  # the weights folder of a model made by add_checkpoint


class ModelRepositoryError(Exception):
    pass


def models(repository: Path) -> list[str]:
    return sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file()) if repository.is_dir() else []


def model_root(repository: Path, model: str) -> Path:
    root = repository / model
    if not (root / "config.pbtxt").is_file():
        known = ", ".join(models(repository)) or "none"
        raise ModelRepositoryError(f"no model {model!r} in {repository} (models: {known})")
    return root


def versions(repository: Path, model: str) -> list[int]:
    root = model_root(repository, model)
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit() and not p.name.startswith("0"))


def served_models(repository: Path) -> set[str]:
    """What a persona may name: each model of the repository, and each of its versions as
    "name/N". Read from disk on every call (a persona edit is rare; a trained version
    appears without a restart)."""
    names: set[str] = set()
    for model in models(repository):
        names.add(model)
        names.update(f"{model}/{v}" for v in versions(repository, model))
    return names


def parameter(repository: Path, model: str, key: str, default: str) -> str:
    """A `parameters` entry of the model's config.pbtxt (`model_dir`, `max_seq_len`, ...)."""
    config = (model_root(repository, model) / "config.pbtxt").read_text()
    match = re.search(rf'key:\s*"{re.escape(key)}".*?string_value:\s*"([^"]*)"', config, re.S)
    return match.group(1) if match else default


def weights_folder(repository: Path, model: str) -> str:
    """The `model_dir` parameter of the model's config (where each version keeps its weights)."""
    folder = parameter(repository, model, "model_dir", "demo")
    if Path(folder).is_absolute():
        raise ModelRepositoryError(f"{model}: model_dir {folder!r} is absolute: versions would share their weights")
    return folder


def version_weights(repository: Path, model: str, version: int | str) -> Path:
    path = model_root(repository, model) / str(version)
    if not path.is_dir():
        raise ModelRepositoryError(f"model {model!r} has no version {version} (versions: {versions(repository, model)})")
    return path / weights_folder(repository, model)


def read_card(repository: Path, model: str, version: int | str) -> dict[str, Any] | None:
    path = repository / model / str(version) / CARD_JSON
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def create_version(
    repository: Path, model: str, base: int, write: Callable[[Path, int], dict[str, Any]],
) -> tuple[int, Path]:
    """Write version N+1 of `model`: the base version's files (model.py, tokenizer, ...),
    then `write(weights_dir, new_version)` puts the new weights in place and returns the
    model card. Renamed into place only when complete. Returns (version, folder)."""
    root = model_root(repository, model)
    base_dir = root / str(base)
    if not base_dir.is_dir():
        raise ModelRepositoryError(f"model {model!r} has no version {base} to start from")
    weights = weights_folder(repository, model)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        for item in base_dir.iterdir():
            if item.name in _SKIP:
                continue
            target = staging / item.name
            if item.is_dir():
                shutil.copytree(item, target, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors",
                                                                          "training_stats.json"))
            else:
                shutil.copy2(item, target)
        version = max(versions(repository, model), default=0) + 1
        card = write(staging / weights, version)
        (staging / CARD_JSON).write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
        (staging / CARD_MD).write_text(render_card(card))
        for path in staging.rglob("*"):  # readable by a Triton running as another user
            path.chmod(0o755 if path.is_dir() else 0o644)
        staging.chmod(0o755)
        while True:  # another training may have taken the number meanwhile
            final = root / str(version)
            try:
                staging.rename(final)
                break
            except OSError:
                if not final.exists():
                    raise
                version += 1
                card["version"] = str(version)
                (staging / CARD_JSON).write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
                (staging / CARD_MD).write_text(render_card(card))
        return version, final
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def render_card(card: dict[str, Any]) -> str:
    if "added_from" in card:  # add_checkpoint's
        return (f"# {card.get('model')} version {card.get('version')}\n\nAdded with `chatbot models add` from"
                f" `{card['added_from']}` ({card.get('added_at', '')}): {card.get('architecture')},"
                f" {card.get('parameters', 0):,} parameters, context {card.get('context')}.\n")
    data, metrics, training = card.get("data", {}), card.get("metrics", {}), card.get("training", {})

    def loss(x: Any) -> str:
        return f"{x:.4f}" if isinstance(x, (int, float)) else "-"

    lines = [
        f"# {card.get('model')} version {card.get('version')}",
        "",
        f"Fine-tuned from version {card.get('base_version')} on {data.get('records', 0)} exported chat records "
        f"({card.get('created_at', '')}).",
        "",
        "## Data",
        "",
        f"- file: `{data.get('file')}` (sha256 `{data.get('sha256', '')[:16]}…`)",
        f"- replies written from {data.get('first') or '-'} to {data.get('last') or '-'}",
        f"- records: {data.get('records', 0)}; trained on {data.get('train_records', 0)}, "
        f"held out {data.get('heldout_records', 0)}; left out: {data.get('excluded') or 'none'}",
        f"- ratings: {data.get('ratings') or {}}; personas: {data.get('personas') or {}}; "
        f"written by: {data.get('written_by') or {}}",
        "",
        "## Metrics (held-out replies, cross-entropy per token)",
        "",
        "| | before | after |",
        "| --- | --- | --- |",
        f"| held-out loss | {loss(metrics.get('heldout_loss_before'))} | {loss(metrics.get('heldout_loss_after'))} |",
        f"| training loss (first step / last 10%) | {loss(metrics.get('train_loss_first'))} "
        f"| {loss(metrics.get('train_loss_last'))} |",
        "",
        f"Held-out tokens: {metrics.get('heldout_tokens', 0)}.",
        "",
        "## Training",
        "",
        f"- {training.get('steps')} steps, {training.get('train_tokens')} target tokens, "
        f"{training.get('seconds', 0):.1f} s",
        f"- {json.dumps(training.get('hyperparameters', {}))}",
        "",
    ]
    return "\n".join(lines)


# -- Triton ----------------------------------------------------------------------------------


def config_with_versions(repository: Path, model: str, keep: list[str]) -> str:
    """The model's config.pbtxt as JSON, serving exactly the versions in `keep`."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    config = model_config_pb2.ModelConfig()
    text_format.Parse((model_root(repository, model) / "config.pbtxt").read_text(), config)
    config.version_policy.Clear()
    config.version_policy.specific.versions.extend(sorted({int(v) for v in keep}))
    return str(json_format.MessageToJson(config))


def triton_versions(triton_url: str, model: str) -> dict[str, str]:
    """version -> state (READY, UNLOADING, UNAVAILABLE...) of the versions Triton knows."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton_url)
    try:
        index = client.get_model_repository_index(as_json=True)
    finally:
        client.close()
    return {m["version"]: m.get("state", "") for m in index.get("models", []) if m.get("name") == model and m.get("version")}


def load_versions(triton_url: str, repository: Path, model: str, keep: list[str], timeout_s: float = 300.0) -> None:
    """Have Triton serve exactly `keep` of `model` (returns once they are ready)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    for v in keep:
        if not (model_root(repository, model) / str(v)).is_dir():
            raise ModelRepositoryError(f"model {model!r} has no version {v} in {repository}")
    client = grpcclient.InferenceServerClient(triton_url)
    try:
        client.load_model(model, config=config_with_versions(repository, model, keep), client_timeout=timeout_s)
        not_ready = [v for v in keep if not client.is_model_ready(model, str(v))]
    except InferenceServerException as e:
        raise ModelRepositoryError(f"Triton could not load {model} versions {keep}: {e.message()}") from None
    finally:
        client.close()
    if not_ready:
        raise ModelRepositoryError(f"Triton loaded {model} but versions {not_ready} are not ready")


def check_checkpoint(folder: Path) -> dict[str, Any]:
    """Load the checkpoint as the server would (tokenizer and weights, on the CPU) and say
    what it is; UnsupportedCheckpoint (a ValueError naming what is missing) if it cannot
    be served."""
    from chatbot.inference.model import LlamaForCausalLM
    from chatbot.inference.tokenizer import ChatTokenizer

    tokenizer = ChatTokenizer.from_pretrained(folder)
    tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    model = LlamaForCausalLM.from_pretrained(folder)
    parameters = sum(p.numel() for p in model.parameters())
    config = json.loads((folder / "config.json").read_text())
    del model
    return {"architecture": (config.get("architectures") or [config.get("model_type", "?")])[0],
            "parameters": parameters, "context": config.get("max_position_embeddings")}


def add_checkpoint(repository: Path, name: str, source: Path, template: str = "chat") -> tuple[int, Path]:
    """Put the checkpoint at `source` (a Hugging Face folder or a .gguf file) into the
    repository as the next version of model `name`, or as its version 1 when there is no
    such model (made from `template`'s config.pbtxt and model.py). Returns (version, folder)."""
    from chatbot.inference.checkpoint import UnsupportedCheckpoint
    from chatbot.inference.gguf_convert import convert_gguf

    if not MODEL_NAME.fullmatch(name):
        raise ModelRepositoryError(f"a model name has 1 to 48 lower-case letters, digits, - or _ (not {name!r})")
    if (repository / name).exists() and name not in models(repository):
        raise ModelRepositoryError(f"{repository / name} exists and is not a model (it has no config.pbtxt): choose another name")
    source = Path(source)
    with tempfile.TemporaryDirectory(prefix="model-add-") as tmp:
        if source.is_file() and source.suffix.lower() == ".gguf":
            folder = Path(tmp) / "converted"
            try:
                convert_gguf(source, folder)
            except UnsupportedCheckpoint:
                raise
            except (ValueError, KeyError, IndexError, EOFError) as e:  # what a damaged file makes numpy and gguf raise
                raise ModelRepositoryError(f"{source}: not a GGUF file that can be read ({type(e).__name__}: {e})") from None
        elif (source / "config.json").is_file():
            folder = source
        else:
            raise ModelRepositoryError(f"{source}: neither a Hugging Face checkpoint folder (with config.json) nor a .gguf file")
        summary = check_checkpoint(folder)

        def write(weights: Path, version: int) -> dict[str, Any]:
            if weights.exists():
                shutil.rmtree(weights)  # the base version's tokenizer and template are not this one's
            shutil.copytree(folder, weights, ignore=shutil.ignore_patterns(".*", "__pycache__"))
            return {"model": name, "version": str(version), "added_from": str(source),
                    "added_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **summary}

        if name in models(repository):
            return create_version(repository, name, max(versions(repository, name), default=0), write)
        return _create_model(repository, name, template, write)


def _create_model(repository: Path, name: str, template: str, write: Callable[[Path, int], dict[str, Any]]) -> tuple[int, Path]:
    """A new model folder: `template`'s config (its name and weights folder changed) and
    model.py, then version 1's weights; renamed into place when complete."""
    source_root = model_root(repository, template)
    config = (source_root / "config.pbtxt").read_text()
    config = re.sub(r'^name:\s*"[^"]*"', f'name: "{name}"', config, count=1, flags=re.M)
    config = re.sub(r'(key:\s*"model_dir".*?string_value:\s*")[^"]*(")', rf"\g<1>{NEW_MODEL_WEIGHTS}\g<2>",
                    config, count=1, flags=re.S)
    newest = max(versions(repository, template), default=0)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=repository))
    try:
        (staging / "config.pbtxt").write_text(config)
        version_dir = staging / "1"
        version_dir.mkdir()
        shutil.copy2(source_root / str(newest) / "model.py", version_dir / "model.py")
        card = write(version_dir / NEW_MODEL_WEIGHTS, 1)
        (version_dir / CARD_JSON).write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
        (version_dir / CARD_MD).write_text(render_card(card))
        for path in staging.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        staging.chmod(0o755)
        final = repository / name
        try:
            staging.rename(final)
        except OSError:
            raise ModelRepositoryError(f"model {name!r} was added by someone else meanwhile: add it again") from None
        return 1, final / "1"
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
