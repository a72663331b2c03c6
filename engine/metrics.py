"""Prometheus metrics: every metric the engine exposes, and how a process renders them.

Two kinds of figure, kept apart on purpose.

**Counts and durations** (events applied, batch apply time, dead letters,
events published and their commit-to-ack time, commands, HTTP requests) are
module-level prometheus-client metrics, updated where the thing happens. The
daemon's hot path pays one counter increment and one histogram observation
per *batch* a lane applies (label children bound once per lane), never per
event; the relay one increment per batch and one observation per event it
published (a subtraction and a bucket search, next to a Kafka round trip).

**Where things stand** (lag per projection and partition, lane state, stalled,
dead letters waiting, parked aggregates, outbox backlog, relay stalled) is not
counted on any hot path: a running daemon does not know its lag (Kafka and the
other daemons do), and keeping gauges current per event would cost the hot
path for a figure read every 15 s. :class:`StatusCollector` renders them at
scrape time from the last :class:`engine.health.StatusSampler` sample, the one
status collect that health and the live page share; a scrape never queries
Postgres or Kafka itself. ``engine_status_sample_age_seconds`` and
``engine_status_sample_ok`` say how old those figures are and whether the
latest collect failed (the gauges then keep the last good sample's figures).

**Several worker processes** (``engine run --workers N``, ``engine api
--workers N``). Each worker counts in its own process; a scrape reaches one
process (the API's kernel-balanced socket hands it to any worker), which must
answer for all of them. prometheus-client's multiprocess mode does that: the
supervisor makes a fresh directory (:func:`workers_directory`) and passes it
to its workers as ``PROMETHEUS_MULTIPROC_DIR``; each worker's prometheus-client
then keeps its values in memory-mapped files there (it reads the variable once,
when it is imported, so it must be in the worker's environment from the
start), and whoever answers a scrape sums every worker's files
(``MultiProcessCollector``): the API worker that got the request, or, for the
daemon, the supervisor, which serves the metrics port itself. A worker that
exits is marked dead (:meth:`WorkerFiles.exited`); its counter files stay, so the
sums never go backwards when a worker is restarted. The directory is removed
when the supervisor ends. A single process uses the ordinary registry.
:data:`MULTIPROCESS_DIR` is read from the environment here, at import, the
same moment prometheus-client reads it to decide where values live: the two
cannot disagree.

**Cardinality is bounded by construction**: projection and store by the
application's code, partition by the topic's partitions, command by the
registered command types, outcome and state by fixed sets, HTTP route by the
API's route templates (``/orders/{order_id}``, never the raw path; a path
matching no route is ``<unmatched>``), HTTP method by a fixed list (anything
else is ``OTHER``), status by HTTP's status codes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from engine.lane_state import LaneState

if TYPE_CHECKING:
    from engine.health import Sample
    from engine.status import EngineStatus

__all__ = [
    "BATCH_APPLY_SECONDS",
    "COMMANDS",
    "COMMAND_SECONDS",
    "CONTENT_TYPE",
    "EVENTS_APPLIED",
    "EVENTS_DEAD_LETTERED",
    "HTTP_REQUESTS",
    "HTTP_REQUEST_SECONDS",
    "METRIC_NAMES",
    "MULTIPROCESS_DIR",
    "MULTIPROCESS_ENV",
    "RELAY_COMMIT_TO_ACK_SECONDS",
    "RELAY_PUBLISHED",
    "StatusCollector",
    "WorkerFiles",
    "render",
    "store_kind",
    "workers_directory",
]

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
MULTIPROCESS_DIR: str | None = os.environ.get(MULTIPROCESS_ENV) or None
"""The workers' shared directory when this process is one of several workers, else None."""

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# No ``*_created`` series: multiprocess mode has none, so one process and several
# workers expose the same families; and nothing here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# -- the daemon -----------------------------------------------------------------------

EVENTS_APPLIED = Counter(
    "engine_events_applied",
    "Events a projection applied to its store (duplicates it skipped are not counted);"
    " the count `engine status` shows as applied.",
    ["projection"],
)
BATCH_APPLY_SECONDS = Histogram(
    "engine_batch_apply_duration_seconds",
    "Time one store call took to apply a batch of a projection (failed attempts included).",
    ["projection", "store"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
EVENTS_DEAD_LETTERED = Counter(
    "engine_events_dead_lettered",
    "Events recorded as dead letters for a projection, failed or parked behind one"
    " (projection * : undecodable, for every projection).",
    ["projection"],
)

# -- the relay ------------------------------------------------------------------------

RELAY_PUBLISHED = Counter(
    "engine_relay_published",
    "Outbox events the relay published to Kafka (acknowledged and marked published).",
)
RELAY_COMMIT_TO_ACK_SECONDS = Histogram(
    "engine_relay_commit_to_ack_seconds",
    "From an event's occurred_at (taken in its command's transaction, just before the"
    " commit) to Kafka's acknowledgement of it.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)

# -- the write side and the API -------------------------------------------------------

COMMAND_OUTCOMES = ("accepted", "duplicate", "rejected", "conflict", "unavailable", "error")
COMMANDS = Counter(
    "engine_commands",
    "Commands executed, by type and outcome (accepted, duplicate: the same id again,"
    " rejected: invalid input or a business rule, conflict, unavailable, error).",
    ["command", "outcome"],
)
COMMAND_SECONDS = Histogram(
    "engine_command_duration_seconds",
    "Time to execute a command (its transaction included), by type and outcome.",
    ["command", "outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
HTTP_REQUESTS = Counter(
    "engine_http_requests",
    "HTTP requests the API answered, by route template, method and status.",
    ["route", "method", "status"],
)
HTTP_REQUEST_SECONDS = Histogram(
    "engine_http_request_duration_seconds",
    "Time the API took to answer a request, by route template and method.",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# -- where things stand (StatusCollector) ---------------------------------------------

_PROJECTION_GAUGES = (
    "engine_projection_lag_events",
    "engine_projection_lag_seconds",
    "engine_projection_state",
    "engine_projection_stalled",
    "engine_projection_dead_letters",
    "engine_projection_parked_aggregates",
)
_OUTBOX_GAUGES = (
    "engine_outbox_backlog_events",
    "engine_outbox_oldest_age_seconds",
    "engine_relay_stalled",
)
_SAMPLE_GAUGES = ("engine_status_sample_age_seconds", "engine_status_sample_ok")

METRIC_NAMES: frozenset[str] = frozenset(
    {
        "engine_events_applied_total",
        "engine_batch_apply_duration_seconds",
        "engine_events_dead_lettered_total",
        "engine_relay_published_total",
        "engine_relay_commit_to_ack_seconds",
        "engine_commands_total",
        "engine_command_duration_seconds",
        "engine_http_requests_total",
        "engine_http_request_duration_seconds",
        *_PROJECTION_GAUGES,
        *_OUTBOX_GAUGES,
        *_SAMPLE_GAUGES,
    }
)
"""Every family the engine exposes, as written in PromQL (histograms by their base name)."""


class _Samples(Protocol):
    """What :class:`StatusCollector` reads: a :class:`engine.health.StatusSampler`."""

    @property
    def latest(self) -> Sample | None: ...

    @property
    def last_good(self) -> Sample | None: ...


class StatusCollector(Collector):
    """The status gauges, rendered at scrape time from a sampler's last good sample.

    ``projections`` renders the per-projection gauges (the daemon's), ``outbox``
    the outbox and relay ones (the relay's): the daemon and the relay each
    expose what they are responsible for. The API renders both, so that it
    alone is enough to scrape; where the daemon or relay is scraped too, the
    same series comes from two jobs (the alert rules take the max). The
    sample's age and whether the latest collect worked are always rendered.
    """

    def __init__(
        self,
        samples: _Samples,
        *,
        projections: bool = True,
        outbox: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._samples = samples
        self._projections = projections
        self._outbox = outbox
        self._clock = clock

    def describe(self) -> Iterable[Metric]:
        return []  # nothing fixed to check at registration: the names are in METRIC_NAMES

    def collect(self) -> Iterable[Metric]:
        latest, good = self._samples.latest, self._samples.last_good
        age = GaugeMetricFamily(
            "engine_status_sample_age_seconds",
            "Age of the status sample the engine_projection_*, engine_outbox_* and"
            " engine_relay_stalled gauges come from (absent before the first good one).",
        )
        if good is not None:
            age.add_metric([], max(0.0, self._clock() - good.taken_at))
        yield age
        ok = GaugeMetricFamily(
            "engine_status_sample_ok",
            "1 when the latest status collect worked, 0 when it failed or none was taken yet.",
        )
        ok.add_metric([], 1.0 if latest is not None and latest.status is not None else 0.0)
        yield ok
        status = good.status if good is not None else None
        if status is None:
            return
        if self._projections:
            yield from _projection_gauges(status)
        if self._outbox:
            yield from _outbox_gauges(status)


def _projection_gauges(status: EngineStatus) -> Iterator[Metric]:
    lag_events = GaugeMetricFamily(
        "engine_projection_lag_events",
        "Messages on the partition the projection has not processed yet.",
        labels=["projection", "partition"],
    )
    lag_seconds = GaugeMetricFamily(
        "engine_projection_lag_seconds",
        "Age of the oldest message on the partition the projection has not processed"
        " (0 when caught up; absent when behind and that message could not be read).",
        labels=["projection", "partition"],
    )
    state = GaugeMetricFamily(
        "engine_projection_state",
        "1 for the projection's current state, 0 for the others.",
        labels=["projection", "state"],
    )
    stalled = GaugeMetricFamily(
        "engine_projection_stalled",
        "1 when the projection is stalled (lag without progress, or detached too long).",
        labels=["projection"],
    )
    dead_letters = GaugeMetricFamily(
        "engine_projection_dead_letters",
        "Dead letters waiting for the projection (its own and those for every projection).",
        labels=["projection"],
    )
    parked = GaugeMetricFamily(
        "engine_projection_parked_aggregates",
        "Aggregates whose events wait behind a dead letter for the projection.",
        labels=["projection"],
    )
    for projection in status.projections:
        name = projection.name
        for p in projection.partitions:
            where = [name, str(p.partition)]
            lag_events.add_metric(where, p.lag_events)
            if p.lag_events == 0:
                lag_seconds.add_metric(where, 0.0)
            elif p.oldest_unapplied_at is not None:
                waited = (status.collected_at - p.oldest_unapplied_at).total_seconds()
                lag_seconds.add_metric(where, max(0.0, waited))
        for each in LaneState:
            state.add_metric([name, each.value], 1.0 if projection.state == each else 0.0)
        stalled.add_metric([name], 1.0 if projection.state == LaneState.STALLED else 0.0)
        dead_letters.add_metric([name], projection.dead_letters)
        parked.add_metric([name], projection.parked_aggregates)
    yield from (lag_events, lag_seconds, state, stalled, dead_letters, parked)


def _outbox_gauges(status: EngineStatus) -> Iterator[Metric]:
    outbox = status.outbox
    yield GaugeMetricFamily(
        "engine_outbox_backlog_events",
        "Events committed to the outbox and not yet published to Kafka.",
        value=outbox.unpublished,
    )
    yield GaugeMetricFamily(
        "engine_outbox_oldest_age_seconds",
        "Age of the oldest unpublished outbox event (0 when none waits).",
        value=outbox.oldest_age_seconds or 0.0,
    )
    yield GaugeMetricFamily(
        "engine_relay_stalled",
        "1 when events wait in the outbox and the relay has published nothing for"
        " ENGINE_RELAY__STALLED_AFTER_S.",
        value=1.0 if outbox.stalled else 0.0,
    )


# -- rendering ------------------------------------------------------------------------


def render(
    extra: Sequence[Collector] = (), *, multiprocess_dir: str | None = MULTIPROCESS_DIR
) -> bytes:
    """The text exposition: this process's metrics, or every worker's summed, plus ``extra``.

    ``multiprocess_dir``: the workers' directory, when this process answers for
    several workers (one of them, or the daemon's supervisor); None: this
    process alone, from the ordinary registry.
    """
    if multiprocess_dir is None:
        text = generate_latest(REGISTRY)
    else:
        workers = CollectorRegistry()
        _multiprocess.MultiProcessCollector(workers, path=multiprocess_dir)  # type: ignore[no-untyped-call]
        text = generate_latest(workers)
    if extra:
        more = CollectorRegistry()
        for collector in extra:
            more.register(collector)
        text += generate_latest(more)
    return text


@dataclass(frozen=True)
class WorkerFiles:
    """The directory a supervisor's workers count into, and what the supervisor does with it."""

    directory: str

    @property
    def env(self) -> dict[str, str]:
        """What each worker's environment needs (set before prometheus-client is imported)."""
        return {MULTIPROCESS_ENV: self.directory}

    def exited(self, pid: int) -> None:
        """Tell the files that worker ``pid`` is gone (its live gauges are dropped)."""
        _multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def workers_directory() -> Iterator[WorkerFiles]:
    """A fresh directory for the workers' metric files, removed on the way out."""
    path = tempfile.mkdtemp(prefix="engine-metrics-")
    try:
        yield WorkerFiles(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


_STORE_KINDS: dict[type, str] = {}


def store_kind(store: object) -> str:
    """The ``store`` label of a store: its module's last part (postgres, redis, elasticsearch).

    A store defined elsewhere (a user's own) is named by its class, lower case.
    """
    kind = _STORE_KINDS.get(type(store))
    if kind is None:
        module = type(store).__module__
        if module.startswith("engine.stores."):
            kind = module.rsplit(".", 1)[1]
        else:
            kind = type(store).__name__.lower()
        _STORE_KINDS[type(store)] = kind
    return kind
