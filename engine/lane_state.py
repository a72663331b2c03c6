"""Each lane's state as its daemon sees it, recorded for ``engine status``.

A daemon knows things about its lanes that no table shows: that one is
detached and why, that it is catching up alone, that the topic's retention
stranded it. :class:`LaneStateRecorder` (the runner's lane observer) writes
them every ``state_interval_s``, one row per (projection, daemon) in
``engine_lane_states``, with the partitions the lane holds. ``engine status``
reads the rows back and combines them with what it measures itself (lag,
progress, parked aggregates): :mod:`engine.projection_state` has those rules.

Why a row can be trusted, and when it cannot. A row says what was true at
``reported_at``; the daemon renews it every interval, so a row older than
three intervals (:func:`stale_after_s`) means its daemon was killed, is hung,
or cannot reach Postgres: either way nothing it says is current. Ages are
computed by Postgres (``now() - reported_at``) so the clocks of the daemon's
and the reader's hosts never meet. A daemon that stops cleanly deletes its
rows, so a stale row is a daemon that went away without saying so.

Recording is for operators, never the daemon's business: every write is
bounded by a timeout and its errors are logged, not raised, so a Postgres
outage costs ``engine status`` its lane states and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import asyncpg

from engine.postgres.migrations import Migration
from engine.settings import RunnerSettings

if TYPE_CHECKING:
    from engine.runner import ProjectionRunner

log = logging.getLogger("engine.lane_state")

LANE_STATE_MIGRATIONS = (
    Migration(
        "engine-0010-lane-states",
        """
        CREATE TABLE engine_lane_states (
            projection  text NOT NULL,
            daemon      text NOT NULL,
            state       text NOT NULL,
            reason      text,
            partitions  integer[] NOT NULL DEFAULT '{}',
            reported_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (projection, daemon)
        );
        """,
    ),
    # Since when the lane has been detached (NULL: attached), by Postgres' clock: a lane
    # detached longer than stalled_after_s is stalled.
    Migration(
        "engine-0011-lane-detached-since",
        "ALTER TABLE engine_lane_states ADD COLUMN detached_since timestamptz;",
    ),
)


class LaneState(StrEnum):
    """Where a projection stands: a daemon reports the first four, ``engine status`` the rest."""

    ATTACHED = "attached"
    CATCHING_UP = "catching up"
    DETACHED = "detached"
    STRANDED = "stranded"
    PARKED = "parked"
    STALLED = "stalled"
    NO_DAEMON = "no daemon"


UNHEALTHY = frozenset({LaneState.STRANDED, LaneState.STALLED, LaneState.DETACHED})

# A dead daemon's rows are deleted by a live one after this long: by then its group
# gave the partitions to the living, whose own rows speak for them.
_FORGET_AFTER_S = 3600.0
_REASON_CHARS = 2000

Judged = tuple[LaneState, str | None]


def stale_after_s(settings: RunnerSettings) -> float:
    """A row older than this is from a daemon that is gone (killed, hung or cut off)."""
    return 3 * settings.state_interval_s


# -- the daemon's side ----------------------------------------------------------------


def lane_state(
    *,
    detached: bool,
    failing: str | None,
    ready: bool,
    unanswered_s: float | None,
    stranded: str | None,
    catching_up: bool,
    hung_after_s: float,
    detached_because: str | None = None,
) -> Judged:
    """One lane's state and why, from what its lane and runner know.

    stranded > detached with store trouble > catching up > detached >
    attached. The runner counts a lane as catching up from the moment it is
    detached, while its catch-up still waits for the store; a lane whose store
    fails, hangs or is not set up is reported detached with that reason, since
    it is not catching up on anything yet.
    """
    if stranded is not None:
        return LaneState.STRANDED, stranded
    hung = unanswered_s is not None and unanswered_s >= hung_after_s
    silent = f"its store has not answered for {unanswered_s:.0f}s" if hung else None
    if detached:
        return _detached(
            failing or silent, ready=ready, catching_up=catching_up, because=detached_because
        )
    if failing:
        return LaneState.ATTACHED, f"attached, retrying: {failing}"
    if silent:
        return LaneState.ATTACHED, f"attached, waiting: {silent}"
    return LaneState.ATTACHED, None if ready else "attached, setting up its store"


def _detached(
    trouble: str | None, *, ready: bool, catching_up: bool, because: str | None
) -> Judged:
    if trouble:
        return LaneState.DETACHED, trouble
    if not ready:
        return LaneState.DETACHED, "waiting for its store to be set up"
    detached = f" (detached: {because})" if because else ""
    if catching_up:
        return LaneState.CATCHING_UP, f"catching up alone from its own offsets{detached}"
    return LaneState.DETACHED, f"its catch-up has not started{detached}"


@dataclass(frozen=True)
class LaneReport:
    """One lane's row: its state, why, and the partitions it holds."""

    projection: str
    state: LaneState
    reason: str | None
    partitions: tuple[int, ...]
    detached_s: float | None = None
    """How long the lane has been detached (None: attached)."""


def observe(runner: ProjectionRunner, hung_after_s: float) -> list[LaneReport]:
    """The state of every lane of ``runner`` now (reads only; no await, so one instant)."""
    now = time.monotonic()
    reports = []
    for lane in runner.lanes:
        since = lane.waiting_since
        state, reason = lane_state(
            detached=lane.detached,
            failing=lane.failing,
            ready=lane.ready.is_set(),
            unanswered_s=None if since is None else now - since,
            stranded=runner.stranded.get(lane.name),
            catching_up=lane.name in runner.catching_up,
            hung_after_s=hung_after_s,
            detached_because=lane.detached_because,
        )
        partitions = tuple(sorted(tp.partition for tp in lane.next_offset))
        detached = None if lane.detached_since is None else now - lane.detached_since
        reports.append(LaneReport(lane.name, state, reason, partitions, detached))
    return reports


_REPORT = """
WITH forgotten AS (
    DELETE FROM engine_lane_states
    WHERE daemon <> $1 AND reported_at < now() - make_interval(secs => $6)
)
INSERT INTO engine_lane_states
    (projection, daemon, state, reason, partitions, reported_at, detached_since)
SELECT l.projection, $1, l.state, l.reason, l.partitions::integer[], now(),
    now() - make_interval(secs => l.detached_s)
FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $7::float8[])
    AS l(projection, state, reason, partitions, detached_s)
ON CONFLICT (projection, daemon) DO UPDATE SET
    state = EXCLUDED.state,
    reason = EXCLUDED.reason,
    partitions = EXCLUDED.partitions,
    reported_at = EXCLUDED.reported_at,
    detached_since = EXCLUDED.detached_since
"""


def daemon_id() -> str:
    """host:pid:random, unique per process (a restarted daemon may reuse a pid)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class LaneStateRecorder:
    """The runner's lane observer: records every lane's state until shutdown, then forgets it."""

    def __init__(
        self, pool: asyncpg.Pool, settings: RunnerSettings, *, daemon: str | None = None
    ) -> None:
        self._pool = pool
        self._settings = settings
        self.daemon = daemon or daemon_id()
        # Two intervals: a write that takes longer could not keep the row fresh anyway.
        self._timeout_s = 2 * settings.state_interval_s
        self._failing = False

    async def watch(self, runner: ProjectionRunner) -> None:
        """Report every ``state_interval_s`` until cancelled; then delete this daemon's rows."""
        loop = asyncio.get_running_loop()
        writing: asyncio.Future[None] | None = None
        try:
            while True:
                started = loop.time()
                # Shielded: a write cut off by the cancel could still land after the delete
                # below and leave a row that looks like a killed daemon.
                writing = asyncio.ensure_future(
                    self.report(observe(runner, self._settings.stall_timeout_s))
                )
                await asyncio.shield(writing)
                elapsed = loop.time() - started
                await asyncio.sleep(max(0.0, self._settings.state_interval_s - elapsed))
        finally:
            # A clean stop says so by leaving no row; shielded, since shutdown cancelled us.
            await asyncio.shield(self._last_words(writing))

    async def _last_words(self, writing: asyncio.Future[None] | None) -> None:
        if writing is not None:
            await asyncio.wait({writing})  # bounded by the write's own timeout; never raises
        await self.forget()

    async def report(self, reports: Sequence[LaneReport]) -> None:
        """Upsert these rows in one statement; bounded, and never raises."""
        if not reports:
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._pool.execute(
                    _REPORT,
                    self.daemon,
                    [r.projection for r in reports],
                    [r.state.value for r in reports],
                    [None if r.reason is None else r.reason[:_REASON_CHARS] for r in reports],
                    ["{" + ",".join(map(str, r.partitions)) + "}" for r in reports],
                    _FORGET_AFTER_S,
                    [r.detached_s for r in reports],
                )
        except Exception as exc:
            self._note(exc)
            return
        if self._failing:
            log.info("recording the lanes' state again")
            self._failing = False

    async def forget(self) -> None:
        """Delete this daemon's rows (a clean stop); bounded, and never raises."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._pool.execute(
                    "DELETE FROM engine_lane_states WHERE daemon = $1", self.daemon
                )
        except Exception as exc:
            log.warning("could not delete this daemon's lane states: %s", exc)

    def _note(self, exc: Exception) -> None:
        # Once per outage at warning: Postgres being down is reported loudly elsewhere.
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self._failing:
            log.debug("cannot record the lanes' state: %s", what)
        else:
            log.warning("cannot record the lanes' state for engine status: %s", what)
            self._failing = True
