"""`/health` (the process is up) and `/ready` (PostgreSQL, NATS and Triton answer)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Response, get
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE

from api.services import Services


class HealthController(Controller):
    path = "/"

    @get("/health")
    async def get_health(self) -> dict[str, str]:
        return {"status": "ok"}

    @get("/ready")
    async def get_ready(self, services: Services) -> Response[dict[str, Any]]:
        checks: dict[str, str] = {}

        def postgres() -> None:
            with services.readmodels.datastore.get_connection() as conn:
                conn.execute("SELECT 1")

        try:
            await services.call(postgres)
            checks["postgres"] = "ok"
        except Exception as e:  # noqa: BLE001
            checks["postgres"] = f"unreachable: {type(e).__name__}"
        checks["nats"] = "ok" if services.nc.is_connected else "disconnected"
        try:
            ready = await services.triton.is_model_ready(services.settings.model_name)
            checks["triton"] = "ok" if ready else "model not ready"
        except Exception as e:  # noqa: BLE001
            checks["triton"] = f"unreachable: {type(e).__name__}"
        ok = all(v == "ok" for v in checks.values())
        return Response({"ready": ok, "checks": checks}, status_code=HTTP_200_OK if ok else HTTP_503_SERVICE_UNAVAILABLE)
