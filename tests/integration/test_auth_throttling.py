"""Password guessing is slowed (issue 14, D5): failed log-ins lock an account for a while,
attempts per client address are bounded, and common passwords are refused."""

from __future__ import annotations

import uuid

import httpx
import pytest

from api.throttle import AuthThrottle
from chatbot.ops.launcher import Stack
from projections.readmodels import read_model_recorder

pytestmark = pytest.mark.integration


async def test_ten_failed_log_ins_lock_the_account_even_for_the_right_password(api_url: str) -> None:
    email, password = f"guess-{uuid.uuid4().hex[:12]}@example.com", "correct horse battery"
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        assert (await http.post("/api/auth/register", json={"email": email, "password": password})).status_code == 201
        for i in range(10):
            r = await http.post("/api/auth/login", json={"email": email, "password": f"wrong guess {i}"})
            assert r.status_code == 401, r.text
        r = await http.post("/api/auth/login", json={"email": email, "password": password})
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
        assert "too many failed log-ins" in r.json()["detail"]
        # an unknown address answers exactly as a wrong password does
        r = await http.post("/api/auth/login", json={"email": f"nobody-{uuid.uuid4().hex}@example.com",
                                                     "password": "whatever it is"})
        assert r.status_code == 401 and r.json()["detail"] == "wrong e-mail address or password"


async def test_the_commonest_passwords_are_refused_at_registration(api_url: str) -> None:
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        for weak in ("password1", "iloveyou", "qwertyuiop", "aaaaaaaaaa"):
            r = await http.post("/api/auth/register", json={"email": f"weak-{uuid.uuid4().hex[:8]}@example.com",
                                                            "password": weak})
            assert r.status_code == 400 and "common" in r.json()["detail"], (weak, r.text)


def test_attempts_from_one_address_are_bounded_across_processes(stack: Stack) -> None:
    """Two throttles on one database (two API processes) share the count."""
    first = AuthThrottle(read_model_recorder(stack.settings.eventsourcing_env()), per_address=5, failures_per_account=0)
    second = AuthThrottle(read_model_recorder(stack.settings.eventsourcing_env()), per_address=5, failures_per_account=0)
    address = f"203.0.113.{uuid.uuid4().int % 250}-{uuid.uuid4().hex[:6]}"
    try:
        answers = [(first if i % 2 else second).attempt(address) for i in range(6)]
        assert answers[:5] == [None] * 5
        assert answers[5] is not None and "too many log-in attempts" in answers[5].message
        assert first.attempt("198.51.100.7-" + uuid.uuid4().hex) is None, "another address is not affected"
    finally:
        first.readmodels.datastore.close()
        second.readmodels.datastore.close()
