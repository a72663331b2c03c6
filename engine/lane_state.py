"""Each lane's state as its daemon sees it, recorded for ``engine status``; and what it adds up to.

A daemon knows things about its lanes that no table shows: that one is
detached and why, that it is catching up alone, that the topic's retention
stranded it. :class:`LaneStateRecorder` (the runner's lane observer) writes
them every ``state_interval_s``, one row per (projection, daemon) in
``engine_lane_states``, with the partitions the lane holds. ``engine status``
reads the rows back and combines them with what it measures itself (lag,
progress, parked aggregates) in :func:`projection_state`.

Why a row can be trusted, and when it cannot. A row says what was true at
``reported_at``; the daemon renews it every interval, so a row older than
three intervals (:func:`stale_after_s`) means its daemon was killed, is hung,
or cannot reach Postgres: either way nothing it says is current. Ages are
computed by Postgres (``now() - reported_at``) so the clocks of the daemon's
and the reader's hosts never meet. A daemon that stops cleanly deletes its
rows, so a stale row is a daemon that went away without saying so.

A stale row alone is not a stall: when a daemon dies its group gives its
partitions to the living, whose rows then name them. So a dead daemon stalls a
projection only for partitions that have events waiting and that no live
daemon holds. Independently of any row, a partition whose oldest waiting event
and whose recorded progress are both older than ``stalled_after_s`` is stalled
too: that catches what no daemon reports (none running, a hung lane).

A lane detached longer than ``stalled_after_s`` is stalled too, whatever its
daemon says it is doing (detached, or catching up). The daemon keeps the time
the lane was first detached (a rebalance restarting its catch-up keeps it;
re-attaching clears it) and each row carries it as a timestamp by Postgres'
clock, so its age is measured like the row's. Why it catches a stall the
progress rule can miss: it needs neither the oldest waiting event's time
(unknown when the record cannot be read in time) nor a progress row that has
stood still (a catch-up that records progress now and then but never reaches
the dispatcher moves it), and it judges the lane the daemon actually runs.
Why it does not fire on a healthy, busy projection: a lane that keeps up, or
slows the dispatcher down by back-pressure, is never detached, however far
behind it is; a lane detached by a short outage catches up and re-attaches
well within the limit. It does fire on a lane still catching up after a long
outage: its read model has then been behind the others for that long, which
is what an operator must hear about; set ``stalled_after_s`` above the
longest catch-up you accept.

Recording is for operators, never the daemon's business: every write is
bounded by a timeout and its errors are logged, not raised, so a Postgres
outage costs ``engine status`` its lane states and nothing else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
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


# Worst last: when daemons, lag and dead letters disagree, the worst news is the state.
_SEVERITY = (
    LaneState.ATTACHED,
    LaneState.PARKED,
    LaneState.NO_DAEMON,
    LaneState.CATCHING_UP,
    LaneState.DETACHED,
    LaneState.STALLED,
    LaneState.STRANDED,
)
UNHEALTHY = frozenset({LaneState.STRANDED, LaneState.STALLED, LaneState.DETACHED})
# What a daemon reports for a lane the dispatcher left behind (stranded is worse already).
_DETACHED = frozenset({LaneState.DETACHED, LaneState.CATCHING_UP})

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


# -- engine status's side -------------------------------------------------------------


@dataclass(frozen=True)
class DaemonReport:
    """A daemon's row for one projection, as read back, with its age."""

    daemon: str
    state: LaneState
    reason: str | None
    partitions: tuple[int, ...]
    age_s: float
    detached_s: float | None = None
    """How long its lane has been detached, as of now (None: attached, or not recorded)."""


@dataclass(frozen=True)
class Waiting:
    """One partition of a projection: events waiting, and how long things have stood still."""

    partition: int
    events: int
    waited_s: float | None
    """Age of the oldest waiting event (None: none waiting, or not read in time)."""
    progress_age_s: float | None
    """Since the projection's progress on the partition last moved (None: never)."""


@dataclass(frozen=True)
class Recorded:
    """What ``engine status`` reads for the lane states: rows and progress ages by projection."""

    reports: dict[str, list[DaemonReport]]
    progress_ages: dict[str, dict[int, float]]


# One round trip, both by primary-key prefix (projection): the rows of every daemon,
# and how long ago each partition's progress moved. Ages by Postgres' clock (see top).
_READ = """
SELECT
    (SELECT coalesce(jsonb_agg(jsonb_build_object(
            'projection', projection, 'daemon', daemon, 'state', state, 'reason', reason,
            'partitions', partitions, 'age_s', extract(epoch FROM now() - reported_at),
            'detached_s', extract(epoch FROM now() - detached_since))),
        '[]'::jsonb)
     FROM engine_lane_states WHERE projection = ANY($1::text[])) AS reports,
    (SELECT coalesce(jsonb_agg(jsonb_build_object(
            'projection', projection, 'partition', partition,
            'age_s', extract(epoch FROM now() - updated_at))),
        '[]'::jsonb)
     FROM engine_partition_progress WHERE projection = ANY($1::text[]) AND topic = $2) AS progress
"""


async def read_recorded(pool: asyncpg.Pool, names: Sequence[str], topic: str) -> Recorded:
    """The lane-state rows and progress ages of these projections (driver errors propagate)."""
    row = await pool.fetchrow(_READ, list(names), topic)
    reports: dict[str, list[DaemonReport]] = {name: [] for name in names}
    for r in json.loads(row["reports"]) if row else []:
        try:
            state = LaneState(r["state"])
        except ValueError:  # written by a newer daemon: not ours to interpret
            continue
        reports[r["projection"]].append(
            DaemonReport(
                r["daemon"],
                state,
                r["reason"],
                tuple(r["partitions"]),
                r["age_s"],
                None if r["detached_s"] is None else float(r["detached_s"]),
            )
        )
    ages: dict[str, dict[int, float]] = {name: {} for name in names}
    for p in json.loads(row["progress"]) if row else []:
        ages[p["projection"]][p["partition"]] = p["age_s"]
    return Recorded(reports, ages)


def projection_state(
    reports: Sequence[DaemonReport],
    waiting: Iterable[Waiting],
    *,
    parked: int,
    stale_after_s: float,
    stalled_after_s: float,
) -> Judged:
    """One projection's state and why, from every daemon's row, its lag and its parked aggregates.

    The worst finding wins (stranded > stalled > detached > catching up >
    no daemon > parked > attached); the reason lists the findings, worst first.
    """
    live = [r for r in reports if r.age_s <= stale_after_s]
    dead = [r for r in reports if r.age_s > stale_after_s]
    lagging = {w.partition: w for w in waiting if w.events > 0}
    several = len(live) > 1
    found: list[Judged] = [_live(r, stalled_after_s, several=several) for r in live]
    silent = _dead_daemons(dead, live, lagging)
    found += silent
    found += _no_progress(lagging, stalled_after_s)
    if parked:
        found.append(
            (
                LaneState.PARKED,
                f"{parked} aggregates parked behind dead letters; see engine dlq list",
            )
        )
    if not live:
        found.append((LaneState.NO_DAEMON, None if silent else _no_daemon(dead)))
    found.sort(key=lambda judged: _SEVERITY.index(judged[0]), reverse=True)
    reasons = list(dict.fromkeys(reason for _state, reason in found if reason))
    return found[0][0], "; ".join(reasons) or None


def _live(report: DaemonReport, stalled_after_s: float, *, several: bool) -> Judged:
    """A live daemon's word, unless its lane has been detached too long: then stalled."""
    state, reason = report.state, report.reason
    detached_s = report.detached_s
    if state in _DETACHED and detached_s is not None and detached_s > stalled_after_s:
        why = f": {reason}" if reason else ""
        state, reason = (
            LaneState.STALLED,
            f"detached for {detached_s:.0f}s (over {stalled_after_s:g}s){why}",
        )
    return state, f"{report.daemon}: {reason}" if several and reason else reason


def _dead_daemons(
    dead: Sequence[DaemonReport], live: Sequence[DaemonReport], lagging: Mapping[int, Waiting]
) -> list[Judged]:
    """Daemons gone silent while events wait on partitions no live daemon holds."""
    held: set[int] = set().union(*(r.partitions for r in live))
    orphaned = {p for p in lagging if p not in held}
    found: list[Judged] = []
    for r in sorted(dead, key=lambda r: r.age_s):
        # Without a live daemon every waiting partition is the dead ones' to process.
        theirs = orphaned if not live else orphaned & set(r.partitions)
        if theirs:
            events = sum(lagging[p].events for p in theirs)
            found.append(
                (
                    LaneState.STALLED,
                    f"no report from daemon {r.daemon} for {r.age_s:.0f}s"
                    f" while {events} events wait on {_partitions(theirs)}",
                )
            )
    return found


def _no_daemon(dead: Sequence[DaemonReport]) -> str:
    if not dead:
        return "no daemon is running"
    latest = min(dead, key=lambda r: r.age_s)
    return f"no daemon is running; the last report was from {latest.daemon} {latest.age_s:.0f}s ago"


def _no_progress(lagging: Mapping[int, Waiting], stalled_after_s: float) -> list[Judged]:
    """Partitions whose oldest waiting event and last progress are both older than the limit."""
    stuck = [
        w
        for w in lagging.values()
        if w.waited_s is not None
        and w.waited_s > stalled_after_s
        and (w.progress_age_s is None or w.progress_age_s > stalled_after_s)
    ]
    if not stuck:
        return []
    events = sum(w.events for w in stuck)
    oldest = max(w.waited_s or 0.0 for w in stuck)
    return [
        (
            LaneState.STALLED,
            f"no progress on {_partitions(w.partition for w in stuck)} for over"
            f" {stalled_after_s:.0f}s while {events} events wait (the oldest {oldest:.0f}s)",
        )
    ]


def _partitions(partitions: Iterable[int]) -> str:
    listed = sorted(partitions)
    word = "partition" if len(listed) == 1 else "partitions"
    return f"{word} {', '.join(map(str, listed))}"
