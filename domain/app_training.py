"""Training: a user's consent to training on their messages, and model rollouts."""

from __future__ import annotations

from typing import Any, Callable
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError

from domain.app_base import ChatApplicationBase
from domain.model_rollout import (
    ModelRollout,
    RolloutNotFound,
    check_model_name,
    check_version,
    rollout_id_for,
)
from domain.user import InvalidCredentials, User


class TrainingCommands(ChatApplicationBase):
    """Consent to training, and which version of a model new replies go to."""

    # -- training: consent and model rollouts ---------------------------------------------

    def set_training_consent(self, user_id: UUID, training: bool) -> bool:
        """Give or withdraw the user's consent to training on their messages; returns the
        consent now in force."""

        def attempt() -> bool:
            user = self._get(User, user_id, InvalidCredentials)
            if user.set_training_consent(training):
                self.save(user)
            return user.training_consent

        return self._retry_races(attempt)

    def training_consent(self, user_id: UUID) -> bool:
        return bool(self._get(User, user_id, InvalidCredentials).training_consent)

    def model_rollout(self, model: str) -> dict[str, Any] | None:
        """The rollout state of a model, or None when none was ever recorded (every reply
        then goes to the version Triton serves by default)."""
        try:
            rollout: ModelRollout = self.repository.get(rollout_id_for(check_model_name(model)))
        except AggregateNotFoundError:
            return None
        return rollout.snapshot()

    def roll_out_model(self, model: str, version: str, percent: float, stable: str | None = None) -> dict[str, Any]:
        """Send `percent` of new replies to `version` of `model`. The first rollout of a
        model records `stable`, the version that served until then."""

        def attempt() -> dict[str, Any]:
            try:
                rollout: ModelRollout = self.repository.get(rollout_id_for(check_model_name(model)))
            except AggregateNotFoundError:
                if stable is None:
                    raise RolloutNotFound(f"name the stable version of {model!r}: none is recorded yet") from None
                rollout = ModelRollout(model=model, stable=check_version(stable))
            rollout.roll_out(version, percent)
            self.save(rollout)
            return rollout.snapshot()

        return self._retry_races(attempt)

    def roll_back_model(self, model: str) -> dict[str, Any]:
        """Every new reply of `model` on its stable version again."""
        return self._change_rollout(model, ModelRollout.roll_back)

    def promote_model(self, model: str) -> dict[str, Any]:
        """The version being rolled out becomes the stable one."""
        return self._change_rollout(model, ModelRollout.promote)

    def _change_rollout(self, model: str, command: Callable[[ModelRollout], Any]) -> dict[str, Any]:
        def attempt() -> dict[str, Any]:
            rollout = self._get(ModelRollout, rollout_id_for(check_model_name(model)), RolloutNotFound)
            command(rollout)
            self.save(rollout)
            return rollout.snapshot()

        return self._retry_races(attempt)
