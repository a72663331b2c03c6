"""/health/live, /health/ready and GET /status on the API's background status sample."""

from __future__ import annotations

import asyncpg

from engine import Resources, Settings
from tests.integration.api.conftest import api_client
from tests.integration.read.expected import eventually


def _sampled_every(settings: Settings, interval_s: float) -> Settings:
    ops = settings.ops.model_copy(update={"status_interval_s": interval_s})
    return settings.model_copy(update={"ops": ops})


async def test_live_and_ready_with_nothing_stalled(
    settings_for_test: Settings, pool: asyncpg.Pool, resources: Resources
) -> None:
    async with api_client(_sampled_every(settings_for_test, 0.2)) as api:
        live = await api.get("/health/live")
        assert (live.status_code, live.json()) == (200, {"status": "ok"})

        async def ready() -> None:
            answer = await api.get("/health/ready")
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert (body["status"], body["problems"]) == ("ready", [])
            assert 0 <= body["sample_age_s"] < 3 * 0.2

        await eventually(ready, timeout_s=30)


async def test_status_answers_from_the_sample_while_it_is_fresh(
    settings_for_test: Settings, pool: asyncpg.Pool, resources: Resources
) -> None:
    # One sample a minute: every GET /status within it is that sample, not a collect.
    async with api_client(_sampled_every(settings_for_test, 60.0)) as api:
        first = await api.get("/status")
        assert first.status_code == 200, first.text
        again = [await api.get("/status") for _ in range(5)]
        assert {a.json()["collected_at"] for a in again} == {first.json()["collected_at"]}
