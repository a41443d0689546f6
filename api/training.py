"""The user's say over training: `PUT /api/me/consent {"training": true|false}`.

Consent is opt-in and recorded as events on the user (`TrainingConsentChanged`); the
dataset export reads them in the log's order, so each message keeps the consent in force
when it was written and a withdrawal covers everything written before it too. The value
in force is also in `GET /api/me` (`training_consent`).
"""

from __future__ import annotations

from uuid import UUID

import msgspec
from litestar import Controller, put

from api.services import Services


class Consent(msgspec.Struct, forbid_unknown_fields=True):
    training: bool


class ConsentController(Controller):
    path = "/api/me/consent"

    @put("/")
    async def update_consent(self, services: Services, user_id: UUID, data: Consent) -> Consent:
        training = await services.call(services.app.set_training_consent, user_id, data.training)
        return Consent(training=training)
