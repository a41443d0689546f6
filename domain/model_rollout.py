"""The `ModelRollout` aggregate: which versions of one Triton model serve new replies.

One aggregate per model name (its id is `uuid5(NAMESPACE, "model-rollout:" + name)`), so
every worker process finds it with one read and follows the same state. A rollout names a
`stable` version, which serves every reply not in the rollout, and optionally a `candidate`
with the share (`percent`) of new replies it serves:

    Started(stable)  ->  RolledOut(candidate, percent)  ->  RolledOut(candidate, other percent) ...
                     ->  RolledBack(candidate)           (every new reply on stable again)
                     or  Promoted(candidate)             (the candidate becomes stable)

A second candidate waits until the first is rolled back or promoted: two experiments at
once would make "which version wrote this reply, and why" hard to answer. Versions are the
numbers of the version folders in the model repository, kept as strings as Triton reports
them in every response (and as `ReplyCompleted.model_version` records them).
"""

from __future__ import annotations

import math
import re
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, event

from domain.ids import NAMESPACE

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")
VERSION_RE = re.compile(r"^[1-9][0-9]{0,8}$")


class RolloutError(Exception):
    pass


class RolloutNotFound(RolloutError):
    pass


class InvalidRollout(RolloutError):
    pass


class NothingToRollBack(RolloutError):
    pass


class RolloutInProgress(RolloutError):
    pass


def rollout_id_for(model: str) -> UUID:
    return uuid5(NAMESPACE, "model-rollout:" + model)


def check_model_name(model: str) -> str:
    if not MODEL_NAME_RE.match(model):
        raise InvalidRollout(f"a model name is 1-80 letters, digits, '_', '-' or '.', got {model!r}")
    return model


def check_version(version: str | int) -> str:
    version = str(version).strip()
    if not VERSION_RE.match(version):
        raise InvalidRollout(f"a model version is a positive whole number, got {version!r}")
    return version


def check_percent(percent: float) -> float:
    """A share of new replies in [0, 100], to a hundredth of a percent."""
    try:
        value = float(percent)
    except (TypeError, ValueError):
        raise InvalidRollout(f"percent is a number from 0 to 100, got {percent!r}") from None
    if math.isnan(value) or not 0.0 <= value <= 100.0:
        raise InvalidRollout(f"percent is a number from 0 to 100, got {percent!r}")
    return round(value, 2)


class ModelRollout(Aggregate):
    @staticmethod
    def create_id(model: str, **_: object) -> UUID:
        return rollout_id_for(model)

    @event("Started")
    def __init__(self, model: str, stable: str) -> None:
        self.model = model
        self.stable = stable
        self.candidate: str | None = None
        self.percent = 0.0

    def roll_out(self, version: str, percent: float) -> None:
        """Send `percent` of new replies to `version`; again with another share ramps it."""
        version, percent = check_version(version), check_percent(percent)
        if version == self.stable:
            raise InvalidRollout(f"version {version} is the stable version of {self.model!r} already")
        if self.candidate is not None and self.candidate != version:
            raise RolloutInProgress(
                f"version {self.candidate} of {self.model!r} is being rolled out: roll it back or promote it first"
            )
        if self.candidate != version or self.percent != percent:
            self._roll_out(version, percent)

    def roll_back(self) -> str:
        """Every new reply on the stable version again; returns the candidate taken out."""
        if self.candidate is None:
            raise NothingToRollBack(f"no version of {self.model!r} is being rolled out")
        candidate = self.candidate
        self._roll_back(candidate)
        return candidate

    def promote(self) -> str:
        """The candidate becomes the stable version; returns it."""
        if self.candidate is None:
            raise NothingToRollBack(f"no version of {self.model!r} is being rolled out")
        candidate = self.candidate
        self._promote(candidate)
        return candidate

    def snapshot(self) -> dict[str, Any]:
        return {
            "model": self.model, "stable": self.stable, "candidate": self.candidate,
            "percent": self.percent, "version": self.version, "updated_at": self.modified_on,
        }

    @event("RolledOut")
    def _roll_out(self, version: str, percent: float) -> None:
        self.candidate = version
        self.percent = percent

    @event("RolledBack")
    def _roll_back(self, version: str) -> None:
        self.candidate = None
        self.percent = 0.0

    @event("Promoted")
    def _promote(self, version: str) -> None:
        self.stable = version
        self.candidate = None
        self.percent = 0.0
