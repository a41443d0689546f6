"""The operator's side of retraining: `chatbot train` and `chatbot models list|rollout|
rollback|promote`.

Order matters where serving is at stake:
- rollout: load the candidate (Triton keeps serving the stable version meanwhile), check
  that it answers, and only then record `RolledOut`, so no worker ever sends a request to
  a version that is not ready;
- rollback and promote: record the event first, wait until every worker has seen it (they
  re-read the rollout every `REFRESH_S`), then unload the version no longer used; requests
  already running on it finish first (Triton unloads a version once its requests end).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from chatbot.inference.repository import (
    ModelRepositoryError,
    create_version,
    load_versions,
    model_root,
    models,
    read_card,
    triton_versions,
    version_weights,
    versions,
)
from chatbot.runtime.config import Settings
from chatbot.training.dataset import read_records
from domain.application import ChatApplication
from domain.model_rollout import (
    InvalidRollout,
    RolloutInProgress,
    check_model_name,
    check_percent,
    check_version,
)
from workers.rollout import REFRESH_S

GRACE_S = 2 * REFRESH_S + 1.0  # after a rollout change, until every worker follows it
PROBE_MESSAGES = [
    {"role": "system", "content": "You are a helpful, friendly assistant."},
    {"role": "user", "content": "Hello! How are you today?"},
]


# -- train ------------------------------------------------------------------------------------


def train(
    settings: Settings, data: Path, max_steps: int, model: str = "chat", base: int | None = None,
    progress: bool = True, **hyperparameters: Any,
) -> dict[str, Any]:
    """Fine-tune `base` (default: the newest version) of `model` on the records in `data`
    and write the next version with its model card; returns the card."""
    from chatbot.training.finetune import finetune

    repository = settings.model_repository
    check_model_name(model)
    records = read_records(data)
    if not records:
        raise ModelRepositoryError(f"{data} holds no records: nothing to train on")
    base = base if base is not None else max(versions(repository, model), default=0)
    base_weights = version_weights(repository, model, base)
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    times = sorted(str(r.get("created_at")) for r in records if r.get("created_at"))

    def write(weights_dir: Path, version: int) -> dict[str, Any]:
        result = finetune(base_weights, records, weights_dir, max_steps=max_steps, progress=progress, **hyperparameters)
        return {
            "model": model,
            "version": str(version),
            "base_version": str(base),
            "created_at": datetime.now(timezone.utc).isoformat(),
            "data": {
                "file": str(data),
                "sha256": digest,
                "records": result.records,
                "conversations": len({r.get("conversation") for r in records}),
                "train_records": result.train_examples,
                "heldout_records": result.heldout_examples,
                "excluded": result.excluded,
                "first": times[0] if times else None,
                "last": times[-1] if times else None,
                "ratings": dict(Counter((r.get("feedback") or {}).get("rating", "none") for r in records)),
                "personas": dict(Counter((r.get("persona") or {}).get("slug", "?") for r in records)),
                "written_by": dict(Counter(str(r.get("model", "?")) for r in records)),
            },
            "metrics": {
                "heldout_loss_before": result.heldout_loss_before,
                "heldout_loss_after": result.heldout_loss_after,
                "heldout_tokens": result.heldout_tokens,
                "train_loss_first": result.train_loss_first,
                "train_loss_last": result.train_loss_last,
            },
            "training": {
                "steps": result.steps, "train_tokens": result.train_tokens, "seconds": round(result.seconds, 2),
                "hyperparameters": result.hyperparameters,
            },
        }

    version, folder = create_version(repository, model, base, write)
    card = read_card(repository, model, version)
    assert card is not None, f"the model card of {folder} was not written"
    card["path"] = str(folder)
    return card


# -- list -------------------------------------------------------------------------------------


def persona_models(app: ChatApplication) -> list[dict[str, Any]]:
    """Every persona (built-in, public or private) and the model it names, from the events."""
    from eventsourcing.utils import get_topic

    from domain.persona import Persona

    topic = get_topic(Persona.Created)
    found: list[dict[str, Any]] = []
    position, head = 0, app.recorder.max_notification_id() or 0
    while position < head:
        batch = app.recorder.select_notifications(position, 1000, stop=head, topics=[topic], inclusive_of_start=False)
        if not batch:
            break
        for n in batch:
            persona: Persona = app.repository.get(n.originator_id)
            found.append({"slug": persona.slug, "model": persona.model, "retired": persona.retired,
                          "visibility": persona.visibility})
        position = batch[-1].id
    return found


def list_models(settings: Settings, app: ChatApplication) -> list[dict[str, Any]]:
    repository = settings.model_repository
    personas = persona_models(app)
    listed = []
    for model in models(repository):
        try:
            loaded = triton_versions(settings.triton_urls[0], model)
        except Exception as e:  # noqa: BLE001 - Triton may be down: still show what is on disk
            loaded = {}
            triton_error = f"Triton unreachable at {settings.triton_urls[0]}: {type(e).__name__}"
        else:
            triton_error = None
        rollout = app.model_rollout(model)
        rows = []
        for v in versions(repository, model):
            version = str(v)
            card = read_card(repository, model, v) or {}
            share = None
            if rollout is not None:
                if version == rollout["candidate"]:
                    share = rollout["percent"]
                elif version == rollout["stable"]:
                    share = round(100.0 - (rollout["percent"] if rollout["candidate"] else 0.0), 2)
            rows.append({
                "version": version, "triton": loaded.get(version, "not loaded" if not triton_error else "unknown"),
                "share": share, "base_version": card.get("base_version"), "metrics": card.get("metrics"),
                "data": {k: card["data"].get(k) for k in ("records", "first", "last")} if card.get("data") else None,
            })
        users = [p for p in personas if p["model"].partition("/")[0] == model and not p["retired"]]
        listed.append({
            "model": model, "rollout": rollout, "versions": rows, "triton_error": triton_error,
            "personas": [{"slug": p["slug"], "pinned": p["model"].partition("/")[2] or None,
                          "visibility": p["visibility"]} for p in users],
        })
    return listed


def render_list(listed: list[dict[str, Any]]) -> str:
    out = []
    for m in listed:
        r = m["rollout"]
        if r is None:
            state = "no rollout recorded: Triton's newest loaded version serves"
        elif r["candidate"]:
            state = f"stable {r['stable']}, candidate {r['candidate']} at {r['percent']:g}%"
        else:
            state = f"stable {r['stable']}"
        out.append(f"{m['model']}  ({state})")
        if m["triton_error"]:
            out.append(f"  ! {m['triton_error']}")
        out.append(f"  {'version':<8} {'triton':<11} {'share':>6}  {'base':<5} {'held-out loss':<17} data")
        for v in m["versions"]:
            metrics = v["metrics"] or {}
            loss = (f"{metrics['heldout_loss_before']:.3f} -> {metrics['heldout_loss_after']:.3f}"
                    if "heldout_loss_after" in metrics else "-")
            data = v["data"] or {}
            described = (f"{data.get('records')} records, {str(data.get('first'))[:10]}..{str(data.get('last'))[:10]}"
                         if data else "-")
            share = f"{v['share']:g}%" if v["share"] is not None else "-"
            out.append(f"  {v['version']:<8} {v['triton']:<11} {share:>6}  {v['base_version'] or '-':<5} {loss:<17} {described}")
        following = [p["slug"] for p in m["personas"] if not p["pinned"]]
        pinned = [f"{p['slug']} (version {p['pinned']})" for p in m["personas"] if p["pinned"]]
        out.append("  personas: " + (", ".join(following) or "none") + (" follow the rollout" if following else ""))
        if pinned:
            out.append("  pinned:   " + ", ".join(pinned))
    return "\n".join(out) if out else "no models in the repository"


# -- rollout, rollback, promote -----------------------------------------------------------------


def probe(triton_url: str, model: str, version: str) -> str:
    """A short generation on exactly this version: it loads, and it answers."""
    from tritonclient.grpc import aio as triton_aio

    from workers.inference import GenerationError, stream_reply

    async def run() -> str:
        client = triton_aio.InferenceServerClient(triton_url)
        try:
            parts = []
            async for delta, final in stream_reply(client, f"{model}/{version}", f"probe-{time.time_ns()}",
                                                   PROBE_MESSAGES, {"max_tokens": 4, "temperature": 0.0}):
                parts.append(delta)
                if final is not None:
                    if final["model_version"] != version:
                        raise ModelRepositoryError(f"asked version {version}, version {final['model_version']} answered")
                    return "".join(parts)
            raise ModelRepositoryError("the probe got no final response")
        finally:
            await client.close()

    try:
        return asyncio.run(run())
    except GenerationError as e:
        raise ModelRepositoryError(
            f"version {version} of {model!r} is loaded but failed a probe request, so no reply goes to it: {e}"
        ) from None


def rollout(
    settings: Settings, app: ChatApplication, model: str, version: str, percent: float, stable: str | None = None,
) -> dict[str, Any]:
    model, version, percent = check_model_name(model), check_version(version), check_percent(percent)
    model_root(settings.model_repository, model)
    state = app.model_rollout(model)
    if state is not None:
        if state["candidate"] not in (None, version):
            raise RolloutInProgress(
                f"version {state['candidate']} of {model!r} is being rolled out: roll it back or promote it first"
            )
        if stable is not None and check_version(stable) != state["stable"]:
            raise InvalidRollout(f"the stable version of {model!r} is {state['stable']}, not {stable}")
        stable = state["stable"]
    elif stable is None:
        ready = sorted((int(v) for v, s in triton_versions(settings.triton_urls[0], model).items()
                        if s == "READY" and v != version), reverse=True)
        if not ready:
            raise InvalidRollout(f"Triton serves no other version of {model!r}: name the stable one with --stable")
        stable = str(ready[0])  # what served every reply until now: Triton's newest other version
    stable = check_version(stable)
    if stable == version:
        raise InvalidRollout(f"version {version} is the stable version of {model!r} already")
    for url in settings.triton_urls:  # every instance serves the versions a rollout names
        load_versions(url, settings.model_repository, model, [stable, version])
        probe(url, model, version)
    return app.roll_out_model(model, version, percent, stable)


def rollback(settings: Settings, app: ChatApplication, model: str, unload: bool = True) -> dict[str, Any]:
    return _stable_only(settings, model, app.roll_back_model(check_model_name(model)), unload)


def promote(settings: Settings, app: ChatApplication, model: str, unload: bool = True) -> dict[str, Any]:
    return _stable_only(settings, model, app.promote_model(check_model_name(model)), unload)


def _stable_only(settings: Settings, model: str, state: dict[str, Any], unload: bool) -> dict[str, Any]:
    """After a rollout ends either way: once the replies in flight had their grace, Triton
    keeps only the stable version loaded."""
    if unload:
        time.sleep(GRACE_S)
        for url in settings.triton_urls:
            load_versions(url, settings.model_repository, model, [state["stable"]])
    return state
