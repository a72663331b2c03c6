"""What the daemons' lane states add up to, per projection, for ``engine status``.

The daemons record their lanes (:mod:`engine.lane_state`); ``engine status``
reads the rows back (:func:`read_recorded`) and judges each projection from
them and from what it measures itself: lag, progress, parked aggregates
(:func:`projection_state`). A row older than :func:`engine.lane_state.stale_after_s`
is a daemon that is gone.

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
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import asyncpg

from engine.lane_state import Judged, LaneState

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
# What a daemon reports for a lane the dispatcher left behind (stranded is worse already).
_DETACHED = frozenset({LaneState.DETACHED, LaneState.CATCHING_UP})


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
