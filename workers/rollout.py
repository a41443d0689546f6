"""Which model version writes a reply: the worker's side of `ModelRollout`.

`pick_version` is pure: a reply id hashes to one of 10,000 buckets, and the buckets below
`percent * 100` go to the candidate. So the choice is deterministic (a redelivered request
goes to the version it went to before, as long as the rollout did not change), independent
of which worker handles it, and raising the percentage only moves replies from stable to
candidate, never back.

`serving_model` is what the worker calls before it sends a request to Triton. It reads the
model's `ModelRollout` from the event store (the truth every worker process shares, cached
for `REFRESH_S`) and asks Triton whether the versions it names are ready, so a version
Triton does not have (after a restart, say) is never asked for: a missing candidate sends
everything to stable, a missing stable falls back to Triton's own choice. A persona that
pins a version ("chat/3") keeps it; a model with no recorded rollout keeps Triton's choice
(""), as before rollouts existed. The version that actually served comes back in every
Triton response, and that is what `ReplyCompleted` records.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from domain.application import ChatApplication

log = logging.getLogger("worker")
BUCKETS = 10_000
REFRESH_S = 1.0  # how stale a worker's view of a rollout may be


def bucket_of(reply_id: UUID | str) -> int:
    """A stable bucket in [0, BUCKETS) for a reply id."""
    digest = hashlib.sha256(UUID(str(reply_id)).bytes).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def pick_version(reply_id: UUID | str, stable: str, candidate: str | None, percent: float) -> str:
    """The version that writes `reply_id`: the candidate for `percent` % of reply ids."""
    if candidate is None or percent <= 0:
        return stable
    return candidate if bucket_of(reply_id) < round(percent * 100) else stable


@dataclass
class _View:
    stable: str
    candidate: str | None
    percent: float
    read_at: float


class RolloutFollower:
    """Every worker's cached view of the rollouts, refreshed from the events."""

    def __init__(self, app: ChatApplication, triton: Any, refresh_s: float = REFRESH_S) -> None:
        self.app, self.triton, self.refresh_s = app, triton, refresh_s
        self._views: dict[str, _View | None] = {}
        self._read_at: dict[str, float] = {}
        self._lock = asyncio.Lock()

    async def view(self, name: str) -> _View | None:
        now = time.monotonic()
        if now - self._read_at.get(name, -1e9) < self.refresh_s:
            return self._views.get(name)
        async with self._lock:
            if time.monotonic() - self._read_at.get(name, -1e9) < self.refresh_s:
                return self._views.get(name)  # another task refreshed it meanwhile
            state = await asyncio.to_thread(self.app.model_rollout, name)
            view = None
            if state is not None:
                stable, candidate = state["stable"], state["candidate"]
                if candidate is not None and not await self._ready(name, candidate):
                    log.warning("rollout of %s: candidate version %s is not loaded; every reply goes to %s",
                                name, candidate, stable)
                    candidate = None
                if not await self._ready(name, stable):
                    log.warning("rollout of %s: stable version %s is not loaded; Triton picks", name, stable)
                    stable = candidate or ""
                    candidate = None
                view = _View(stable, candidate, float(state["percent"]), time.monotonic())
            self._views[name], self._read_at[name] = view, time.monotonic()
            return view

    async def _ready(self, name: str, version: str) -> bool:
        try:
            return bool(await self.triton.is_model_ready(name, version))
        except Exception:  # noqa: BLE001 - Triton unreachable: the request will say so itself
            return True

    async def model_for(self, model: str, reply_id: UUID | str) -> str:
        """`model` as the worker should send it to Triton: "name" or "name/version"."""
        name, _, pinned = model.partition("/")
        if pinned:
            return model
        view = await self.view(name)
        if view is None:
            return model
        version = pick_version(reply_id, view.stable, view.candidate, view.percent)
        return f"{name}/{version}" if version else name


_followers: dict[tuple[int, int], RolloutFollower] = {}


async def serving_model(app: ChatApplication, triton: Any, model: str, reply_id: UUID | str) -> str:
    """`RolloutFollower.model_for` with one follower per (application, Triton client)."""
    key = (id(app), id(triton))
    follower = _followers.get(key)
    if follower is None or follower.app is not app or follower.triton is not triton:
        follower = _followers[key] = RolloutFollower(app, triton)
    return await follower.model_for(model, reply_id)
