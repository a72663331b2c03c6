"""The lane-state rules: a lane's state as its daemon sees it, and a projection's in status."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, cast

import asyncpg
import pytest
from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from engine.lane import Lane
from engine.lane_state import (
    LaneReport,
    LaneState,
    LaneStateRecorder,
    lane_state,
    stale_after_s,
)
from engine.projection_state import DaemonReport, Waiting, projection_state
from engine.runner import ProjectionRunner
from engine.settings import RunnerSettings

A, B = "host:1:aaaaaa", "host:2:bbbbbb"
STALE_S, STALLED_S = 6.0, 30.0


def _lane(**changes: object) -> tuple[LaneState, str | None]:
    facts: dict[str, object] = {
        "detached": False,
        "failing": None,
        "ready": True,
        "unanswered_s": None,
        "stranded": None,
        "catching_up": False,
        "hung_after_s": 3.0,
        **changes,
    }
    return lane_state(**facts)  # type: ignore[arg-type]


def test_a_ready_attached_lane_is_attached_with_nothing_to_say() -> None:
    assert _lane() == (LaneState.ATTACHED, None)
    assert _lane(unanswered_s=0.5) == (LaneState.ATTACHED, None)  # a store call in flight


def test_an_attached_lane_in_trouble_is_still_attached_and_says_what_it_waits_for() -> None:
    assert _lane(failing="ConnectionError: refused") == (
        LaneState.ATTACHED,
        "attached, retrying: ConnectionError: refused",
    )
    assert _lane(unanswered_s=4.2) == (
        LaneState.ATTACHED,
        "attached, waiting: its store has not answered for 4s",
    )
    assert _lane(ready=False) == (LaneState.ATTACHED, "attached, setting up its store")


def test_stranded_wins_over_everything() -> None:
    why = "order_search is stopped: run `engine rebuild order_search`"
    for changes in ({}, {"detached": True, "catching_up": True, "failing": "x"}):
        assert _lane(stranded=why, **changes) == (LaneState.STRANDED, why)


def test_a_detached_lane_catching_up_with_an_answering_store_is_catching_up() -> None:
    assert _lane(detached=True, catching_up=True) == (
        LaneState.CATCHING_UP,
        "catching up alone from its own offsets",
    )
    # A store call in flight for less than the hung bound is normal catching up.
    assert _lane(detached=True, catching_up=True, unanswered_s=1.0)[0] is LaneState.CATCHING_UP


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"failing": "ConnectionTimeout: read timed out"}, "ConnectionTimeout: read timed out"),
        ({"unanswered_s": 12.4}, "its store has not answered for 12s"),
        ({"ready": False}, "waiting for its store to be set up"),
    ],
)
def test_a_detached_lane_whose_store_is_in_trouble_is_detached_with_that_reason(
    changes: dict[str, object], reason: str
) -> None:
    # The runner counts it as catching up already; it is not, until its store answers.
    for catching_up in (True, False):
        assert _lane(detached=True, catching_up=catching_up, **changes) == (
            LaneState.DETACHED,
            reason,
        )


def test_a_detached_lane_not_catching_up_yet_is_detached() -> None:
    state, reason = _lane(detached=True)
    assert state is LaneState.DETACHED and reason


def _report(
    daemon: str,
    state: LaneState = LaneState.ATTACHED,
    reason: str | None = None,
    *,
    partitions: Sequence[int] = (0, 1, 2),
    age_s: float = 1.0,
    detached_s: float | None = None,
) -> DaemonReport:
    return DaemonReport(daemon, state, reason, tuple(partitions), age_s, detached_s)


def _waiting(
    partition: int, events: int = 0, waited_s: float | None = None, progress_age_s: float = 1.0
) -> Waiting:
    return Waiting(partition, events, waited_s if events else None, progress_age_s)


CAUGHT_UP = [_waiting(0), _waiting(1), _waiting(2)]


def _state(
    reports: Sequence[DaemonReport], waiting: Sequence[Waiting] = CAUGHT_UP, parked: int = 0
) -> tuple[LaneState, str | None]:
    return projection_state(
        reports, waiting, parked=parked, stale_after_s=STALE_S, stalled_after_s=STALLED_S
    )


def test_rows_go_stale_after_three_intervals() -> None:
    assert stale_after_s(RunnerSettings(state_interval_s=0.5)) == 1.5


def test_a_live_attached_daemon_makes_it_attached() -> None:
    assert _state([_report(A)]) == (LaneState.ATTACHED, None)
    assert _state([_report(A, reason="attached, retrying: boom")]) == (
        LaneState.ATTACHED,
        "attached, retrying: boom",
    )


def test_no_rows_is_no_daemon() -> None:
    assert _state([]) == (LaneState.NO_DAEMON, "no daemon is running")


def test_a_stale_row_without_lag_is_no_daemon_naming_the_last_one() -> None:
    state, reason = _state([_report(A, age_s=40)])
    assert state is LaneState.NO_DAEMON
    assert reason is not None and A in reason and "40s ago" in reason


def test_a_dead_daemon_with_events_waiting_stalls_it_naming_the_daemon() -> None:
    waiting = [_waiting(0, events=5, waited_s=2.0), _waiting(1), _waiting(2)]
    state, reason = _state([_report(A, age_s=9.6)], waiting)
    assert state is LaneState.STALLED
    assert reason == f"no report from daemon {A} for 10s while 5 events wait on partition 0"


def test_a_dead_daemon_whose_partitions_a_live_one_took_over_is_ignored() -> None:
    waiting = [_waiting(0, events=5, waited_s=2.0), _waiting(1), _waiting(2)]
    reports = [_report(A, partitions=(0, 1), age_s=60), _report(B, partitions=(0, 1, 2))]
    assert _state(reports, waiting) == (LaneState.ATTACHED, None)


def test_a_dead_daemon_stalls_only_the_waiting_partitions_nobody_live_holds() -> None:
    waiting = [_waiting(0, events=3, waited_s=1.0), _waiting(1, events=4, waited_s=1.0)]
    reports = [_report(A, partitions=(1,), age_s=60), _report(B, partitions=(0, 2))]
    state, reason = _state(reports, waiting)
    assert state is LaneState.STALLED
    assert reason is not None and "4 events wait on partition 1" in reason and A in reason


def test_events_waiting_with_progress_older_than_the_limit_is_stalled() -> None:
    stuck = [_waiting(0, events=7, waited_s=45.0, progress_age_s=50.0), _waiting(1), _waiting(2)]
    state, reason = _state([_report(A)], stuck)
    assert state is LaneState.STALLED
    assert reason == "no progress on partition 0 for over 30s while 7 events wait (the oldest 45s)"


@pytest.mark.parametrize(
    "waiting",
    [
        # An idle partition's first new event: old progress, but the event is fresh.
        _waiting(0, events=1, waited_s=0.5, progress_age_s=86_400.0),
        # Events waited long, but the projection is moving through them.
        _waiting(0, events=900, waited_s=45.0, progress_age_s=0.2),
        # Waiting, but when the oldest was published could not be read: no claim.
        Waiting(0, 3, None, 86_400.0),
    ],
)
def test_lag_alone_is_not_a_stall(waiting: Waiting) -> None:
    assert _state([_report(A)], [waiting])[0] is LaneState.ATTACHED


def test_no_daemon_and_events_waiting_past_the_limit_is_stalled() -> None:
    never = [Waiting(0, 2, 31.0, None)]  # no progress row: never processed
    state, reason = _state([], never)
    assert state is LaneState.STALLED and reason is not None
    assert reason.startswith("no progress on partition 0") and "no daemon is running" in reason


def test_parked_aggregates_make_an_attached_projection_parked() -> None:
    assert _state([_report(A)], parked=3) == (
        LaneState.PARKED,
        "3 aggregates parked behind dead letters; see engine dlq list",
    )
    # Worse news wins, and the parked aggregates are still mentioned after it.
    state, reason = _state([_report(A, LaneState.DETACHED, "ConnectionError")], parked=3)
    assert state is LaneState.DETACHED
    assert reason == "ConnectionError; 3 aggregates parked behind dead letters; see engine dlq list"


def test_the_worst_daemon_wins_and_every_daemon_is_named_when_several() -> None:
    reports = [
        _report(A, LaneState.CATCHING_UP, "catching up alone from its own offsets"),
        _report(B, LaneState.STRANDED, "retention deleted events it needed"),
    ]
    state, reason = _state(reports)
    assert state is LaneState.STRANDED
    assert reason == (
        f"{B}: retention deleted events it needed; {A}: catching up alone from its own offsets"
    )


@pytest.mark.parametrize(
    ("worse", "better"),
    [
        (LaneState.STRANDED, LaneState.STALLED),
        (LaneState.STALLED, LaneState.DETACHED),
        (LaneState.DETACHED, LaneState.CATCHING_UP),
        (LaneState.CATCHING_UP, LaneState.PARKED),
        (LaneState.PARKED, LaneState.ATTACHED),
    ],
)
def test_worst_state_order(worse: LaneState, better: LaneState) -> None:
    reports = [_report(A, better, "better"), _report(B, worse, "worse")]
    assert _state(reports)[0] is worse


# -- a lane detached too long -------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (LaneState.DETACHED, "its store has not answered for 40s"),
        # The rebalance case of issue 14: "catching up" for ever behind a frozen store.
        (LaneState.CATCHING_UP, "catching up alone from its own offsets (detached: hung store)"),
    ],
)
def test_a_lane_detached_longer_than_the_limit_is_stalled_saying_for_how_long(
    state: LaneState, reason: str
) -> None:
    # Progress moved a moment ago and nothing waits long: only the detach tells.
    assert _state([_report(A, state, reason, detached_s=45.4)]) == (
        LaneState.STALLED,
        f"detached for 45s (over 30s): {reason}",
    )


def test_a_lane_detached_within_the_limit_keeps_its_state() -> None:
    report = _report(A, LaneState.CATCHING_UP, "catching up alone", detached_s=29.0)
    assert _state([report]) == (LaneState.CATCHING_UP, "catching up alone")


def test_with_several_daemons_the_one_whose_lane_is_detached_too_long_is_named() -> None:
    reports = [
        _report(A, partitions=(0, 1)),
        _report(B, LaneState.DETACHED, "hung store", partitions=(2,), detached_s=31.0),
    ]
    assert _state(reports) == (LaneState.STALLED, f"{B}: detached for 31s (over 30s): hung store")


def test_a_dead_daemons_detached_lane_is_judged_by_the_dead_daemon_rule() -> None:
    # Its row is stale: what it said (detached since long ago) is not current.
    report = _report(A, LaneState.DETACHED, "hung store", age_s=60.0, detached_s=90.0)
    assert _state([report]) == (
        LaneState.NO_DAEMON,
        f"no daemon is running; the last report was from {A} 60s ago",
    )


REPORTED = st.sampled_from([s for s in LaneState if s not in {LaneState.NO_DAEMON}])


@given(
    state=REPORTED,
    detached_s=st.none() | st.floats(min_value=0, max_value=1e6),
    events=st.integers(min_value=0, max_value=10**6),
    waited_s=st.floats(min_value=0, max_value=1e6),
)
def test_the_detach_rule_stalls_exactly_the_lanes_detached_past_the_limit(
    state: LaneState, detached_s: float | None, events: int, waited_s: float
) -> None:
    # A busy projection: any lag, any wait, progress a moment ago.
    busy = [_waiting(0, events=events, waited_s=waited_s, progress_age_s=0.5)]
    judged, _reason = _state([_report(A, state, "why", detached_s=detached_s)], busy)
    too_long = detached_s is not None and detached_s > STALLED_S
    if state in {LaneState.DETACHED, LaneState.CATCHING_UP}:
        assert (judged is LaneState.STALLED) == too_long
    else:  # attached, however far behind, is never stalled by lag it is moving through
        assert judged is state


def test_a_lane_keeps_the_time_it_was_first_detached_until_it_re_attaches() -> None:
    lane = cast(Lane, SimpleNamespace(_detached=False, detached_since=None))
    detach = Lane.detached.fset
    assert detach is not None
    detach(lane, True)
    first = lane.detached_since
    assert first is not None and first <= time.monotonic()
    detach(lane, True)  # a rebalance restarts its catch-up: still detached since then
    assert lane.detached_since == first
    detach(lane, False)
    assert lane.detached_since is None


# -- the recorder, with Postgres faults injected ---------------------------------------


class _Postgres:
    """Stands in for the pool: records statements, or hangs, or fails, as told."""

    def __init__(self, *, hang: bool = False, fail: bool = False) -> None:
        self.hang, self.fail = hang, fail
        self.statements: list[tuple[str, tuple[Any, ...]]] = []
        self.upserted = asyncio.Event()

    async def execute(self, sql: str, *args: Any) -> str:
        if self.hang:
            await asyncio.Event().wait()
        if self.fail:
            raise ConnectionRefusedError("Connect call failed ('127.0.0.1', 54329)")
        self.statements.append((sql, args))
        if "INSERT" in sql and sum("INSERT" in q for q, _ in self.statements) >= 2:
            self.upserted.set()
        return "OK"


def _recorder(postgres: _Postgres) -> LaneStateRecorder:
    settings = RunnerSettings(state_interval_s=0.05)
    return LaneStateRecorder(cast(asyncpg.Pool, postgres), settings, daemon="host:7:abcdef")


ONE = [LaneReport("order_search", LaneState.DETACHED, "ConnectionError", (0, 2))]


@pytest.mark.parametrize("fault", [{"hang": True}, {"fail": True}])
async def test_postgres_down_or_hung_costs_a_report_not_the_daemon(
    fault: dict[str, bool], caplog: pytest.LogCaptureFixture
) -> None:
    recorder = _recorder(_Postgres(**fault))
    with caplog.at_level(logging.DEBUG, logger="engine.lane_state"):
        for _ in range(3):  # each bounded by the timeout; none raises
            await asyncio.wait_for(recorder.report(ONE), timeout=5)
        await asyncio.wait_for(recorder.forget(), timeout=5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # Once per outage for the reports (then debug), once for the failed clean-up.
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("cannot record the lanes' state for engine status")


async def test_the_recorder_reports_until_cancelled_then_deletes_its_rows() -> None:
    postgres = _Postgres()
    recorder = _recorder(postgres)
    ready = asyncio.Event()
    ready.set()
    lane = SimpleNamespace(
        name="order_search",
        detached=True,
        detached_because="hung store: no answer for 3.0s",
        failing=None,
        ready=ready,
        waiting_since=None,
        detached_since=time.monotonic() - 12.0,
        next_offset={TopicPartition("t", 2): 9, TopicPartition("t", 0): 4},
    )
    runner = SimpleNamespace(lanes=[lane], stranded={}, catching_up=frozenset({lane.name}))
    watching = asyncio.create_task(recorder.watch(cast(ProjectionRunner, runner)))
    await asyncio.wait_for(postgres.upserted.wait(), timeout=5)
    watching.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watching

    sql, args = postgres.statements[0]
    assert "INSERT INTO engine_lane_states" in sql
    assert args[:5] == (
        "host:7:abcdef",
        ["order_search"],
        ["catching up"],
        ["catching up alone from its own offsets (detached: hung store: no answer for 3.0s)"],
        ["{0,2}"],
    )
    (detached_s,) = args[6]
    assert 12.0 <= detached_s < 20.0  # how long ago it was detached, for Postgres' clock
    last, last_args = postgres.statements[-1]
    assert last.startswith("DELETE FROM engine_lane_states") and last_args == ("host:7:abcdef",)
