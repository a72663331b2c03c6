"""readiness(): the verdict of /health/ready from the last status sample; the sampler's end."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from engine.health import Problem, Readiness, Sample, StatusSampler, readiness
from engine.lane_state import LaneState
from engine.status import EngineStatus, OutboxStatus, ProjectionStatus

INTERVAL_S = 5.0
NOW = 1000.0
DETACHED_TOO_LONG = "detached for 45s (over 30s): its store has not answered for 40s"
RELAY = "12 events wait in the outbox (the oldest 40s) and nothing was published for 41s"


def _status(*projections: ProjectionStatus, relay_stalled: str | None = None) -> EngineStatus:
    return EngineStatus(
        collected_at=datetime.now(UTC),
        topic="orders.events",
        projections=list(projections),
        outbox=OutboxStatus(
            unpublished=12 if relay_stalled else 0,
            oldest_age_seconds=40.0 if relay_stalled else None,
            stalled=relay_stalled is not None,
            stalled_reason=relay_stalled,
        ),
    )


def _projection(name: str, state: LaneState = LaneState.ATTACHED, reason: str | None = None):
    return ProjectionStatus(name=name, state=state, state_reason=reason)


def _sample(status: EngineStatus | None, age_s: float = 1.0, error: str | None = None) -> Sample:
    return Sample(NOW - age_s, status, error)


def _ready(sample: Sample | None, **flags: bool) -> Readiness:
    return readiness(sample, interval_s=INTERVAL_S, now=NOW, **flags)


def test_ready_when_nothing_is_stalled_even_detached_or_behind() -> None:
    status = _status(
        _projection("order_details"),
        # Detached for less than the limit: reported, but not a reason to leave rotation.
        _projection("order_search", LaneState.DETACHED, "its store has not answered for 4s"),
    )
    verdict = _ready(_sample(status, age_s=2.0))
    assert verdict == Readiness(True, (), 2.0)
    assert verdict.body() == {"status": "ready", "problems": [], "sample_age_s": 2.0}


def test_a_stalled_projection_and_a_stalled_relay_are_each_named_with_the_reason() -> None:
    status = _status(
        _projection("order_details"),
        _projection("order_search", LaneState.STALLED, DETACHED_TOO_LONG),
        relay_stalled=RELAY,
    )
    verdict = _ready(_sample(status))
    assert not verdict.ready
    assert verdict.problems == (Problem("order_search", DETACHED_TOO_LONG), Problem("relay", RELAY))
    assert verdict.body()["status"] == "not ready"
    assert verdict.body()["problems"] == [
        {"component": "order_search", "reason": DETACHED_TOO_LONG},
        {"component": "relay", "reason": RELAY},
    ]


def test_each_side_can_be_left_out() -> None:
    status = _status(
        _projection("order_search", LaneState.STALLED, DETACHED_TOO_LONG), relay_stalled=RELAY
    )
    assert _ready(_sample(status), projections=False).problems == (Problem("relay", RELAY),)
    assert _ready(_sample(status), relay=False).problems == (
        Problem("order_search", DETACHED_TOO_LONG),
    )
    assert _ready(_sample(status), projections=False, relay=False).ready


@pytest.mark.parametrize(
    ("sample", "reason"),
    [
        (None, "no status sample taken yet"),
        (_sample(None, error="ServiceUnavailableError: Kafka"), "cannot collect the status"),
        (_sample(_status(_projection("order_details")), age_s=16.0), "16s old"),
    ],
)
def test_a_watcher_that_cannot_see_is_not_ready(sample: Sample | None, reason: str) -> None:
    verdict = _ready(sample)
    assert not verdict.ready
    (problem,) = verdict.problems
    assert problem.component == "status" and reason in problem.reason


async def test_a_collect_in_flight_when_the_sampler_stops_may_finish_within_the_grace() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    finished: list[bool] = []

    async def slow_collect() -> EngineStatus:
        started.set()
        await release.wait()
        finished.append(True)
        raise ValueError("collected")  # a failed sample: no status needed for this test

    sampler = StatusSampler(slow_collect, interval_s=0.1, timeout_s=60, stop_grace_s=5)
    running = asyncio.create_task(sampler.run())
    await asyncio.wait_for(started.wait(), timeout=5)
    running.cancel()
    await asyncio.sleep(0.05)
    assert not running.done()  # waiting for the collect, not cutting it off
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert finished == [True]


async def test_the_sampler_cancels_its_collect_in_flight_past_the_grace() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def hanging_collect() -> EngineStatus:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    sampler = StatusSampler(hanging_collect, interval_s=0.1, timeout_s=60, stop_grace_s=0.1)
    running = asyncio.create_task(sampler.run())
    await asyncio.wait_for(started.wait(), timeout=5)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert cancelled.is_set()  # not left reading through connections about to close
