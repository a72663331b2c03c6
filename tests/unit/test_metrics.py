"""engine.metrics: the status gauges rendered from a sample, the names, the HTTP route label."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import httpx
from fastapi import FastAPI
from prometheus_client import REGISTRY, CollectorRegistry, Metric
from prometheus_client.parser import text_string_to_metric_families

from engine import metrics
from engine.api.metrics import UNMATCHED, install_metrics
from engine.health import Sample
from engine.lane_state import LaneState
from engine.status import EngineStatus, OutboxStatus, PartitionLag, ProjectionStatus
from engine.stores.redis import RedisHashStore

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


class _Samples:
    def __init__(self, latest: Sample | None, last_good: Sample | None) -> None:
        self.latest = latest
        self.last_good = last_good


def _status() -> EngineStatus:
    return EngineStatus(
        collected_at=NOW,
        topic="t",
        projections=[
            ProjectionStatus(
                name="order_search",
                dead_letters=2,
                state=LaneState.STALLED,
                partitions=[
                    PartitionLag(partition=0, next_offset=5, end_offset=5),
                    PartitionLag(
                        partition=1,
                        next_offset=3,
                        end_offset=10,
                        oldest_unapplied_at=NOW - timedelta(seconds=42),
                    ),
                    # Behind, but the oldest message could not be read: no seconds figure.
                    PartitionLag(partition=2, next_offset=0, end_offset=1),
                ],
            ),
            ProjectionStatus(name="order_details", state=LaneState.ATTACHED),
        ],
        outbox=OutboxStatus(unpublished=7, oldest_age_seconds=3.5, stalled=True),
    )


def _collect(collector: metrics.StatusCollector) -> dict[str, Metric]:
    registry = CollectorRegistry()
    registry.register(collector)
    return {m.name: m for m in registry.collect()}


def _values(metric: Metric) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in metric.samples}


def test_the_status_collector_renders_a_sample_per_projection_and_partition() -> None:
    sample = Sample(taken_at=100.0, status=_status())
    found = _collect(metrics.StatusCollector(_Samples(sample, sample), clock=lambda: 101.5))

    lag = _values(found["engine_projection_lag_events"])
    assert lag[(("partition", "0"), ("projection", "order_search"))] == 0
    assert lag[(("partition", "1"), ("projection", "order_search"))] == 7
    assert lag[(("partition", "2"), ("projection", "order_search"))] == 1
    seconds = _values(found["engine_projection_lag_seconds"])
    assert seconds[(("partition", "0"), ("projection", "order_search"))] == 0
    assert seconds[(("partition", "1"), ("projection", "order_search"))] == 42
    assert (("partition", "2"), ("projection", "order_search")) not in seconds
    states = _values(found["engine_projection_state"])
    assert len(states) == 2 * len(LaneState)
    assert {k for k, v in states.items() if v == 1} == {
        (("projection", "order_search"), ("state", "stalled")),
        (("projection", "order_details"), ("state", "attached")),
    }
    assert _values(found["engine_projection_stalled"]) == {
        (("projection", "order_search"),): 1,
        (("projection", "order_details"),): 0,
    }
    assert _values(found["engine_projection_dead_letters"])[(("projection", "order_search"),)] == 2
    assert (
        _values(found["engine_projection_parked_aggregates"])[(("projection", "order_details"),)]
        == 0
    )
    assert _values(found["engine_outbox_backlog_events"]) == {(): 7}
    assert _values(found["engine_outbox_oldest_age_seconds"]) == {(): 3.5}
    assert _values(found["engine_relay_stalled"]) == {(): 1}
    assert _values(found["engine_status_sample_age_seconds"]) == {(): 1.5}
    assert _values(found["engine_status_sample_ok"]) == {(): 1}


def test_each_process_shows_its_part_and_a_failed_sample_keeps_the_last_good_figures() -> None:
    good = Sample(taken_at=100.0, status=_status())
    failed = Sample(taken_at=110.0, status=None, error="TimeoutError")
    samples = _Samples(failed, good)
    relay = _collect(metrics.StatusCollector(samples, projections=False, clock=lambda: 112.0))
    assert "engine_projection_lag_events" not in relay
    assert _values(relay["engine_outbox_backlog_events"]) == {(): 7}
    assert _values(relay["engine_status_sample_ok"]) == {(): 0}
    assert _values(relay["engine_status_sample_age_seconds"]) == {(): 12}  # the good one's age
    daemon = _collect(metrics.StatusCollector(samples, outbox=False))
    assert "engine_outbox_backlog_events" not in daemon and "engine_relay_stalled" not in daemon
    assert "engine_projection_lag_events" in daemon

    none = _collect(metrics.StatusCollector(_Samples(None, None)))
    assert set(none) == {"engine_status_sample_age_seconds", "engine_status_sample_ok"}
    assert _values(none["engine_status_sample_ok"]) == {(): 0}
    assert _values(none["engine_status_sample_age_seconds"]) == {}


def test_every_family_rendered_is_in_metric_names_and_every_name_is_rendered() -> None:
    metrics.EVENTS_APPLIED.labels("p").inc(0)
    metrics.BATCH_APPLY_SECONDS.labels("p", "postgres")
    metrics.EVENTS_DEAD_LETTERED.labels("p")
    metrics.COMMANDS.labels("C", "accepted")
    metrics.COMMAND_SECONDS.labels("C", "accepted")
    metrics.HTTP_REQUESTS.labels("/", "GET", "200")
    metrics.HTTP_REQUEST_SECONDS.labels("/", "GET")
    sample = Sample(taken_at=0.0, status=_status())
    text = metrics.render([metrics.StatusCollector(_Samples(sample, sample))]).decode()
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    # As PromQL names them: counters with _total, histograms by their base name.
    promql = {
        f"{name}_total" if kind == "counter" else name
        for name, kind in families.items()
        if name.startswith("engine_")
    }
    assert promql == metrics.METRIC_NAMES
    assert all(name.startswith("engine_") for name in metrics.METRIC_NAMES)


def test_a_store_is_labelled_by_its_kind() -> None:
    class MyStore:
        pass

    assert metrics.store_kind(RedisHashStore.__new__(RedisHashStore)) == "redis"
    assert metrics.store_kind(MyStore()) == "mystore"


def _count(route: str, method: str, status: str) -> float:
    labels = {"route": route, "method": method, "status": status}
    return REGISTRY.get_sample_value("engine_http_requests_total", labels) or 0.0


async def test_requests_are_labelled_by_route_template_never_by_raw_path() -> None:
    app = FastAPI()
    prefix = f"/t{uuid.uuid4().hex[:8]}"

    @app.get(prefix + "/orders/{order_id}")
    async def order(order_id: str) -> dict[str, str]:
        return {"id": order_id}

    install_metrics(app)
    template = prefix + "/orders/{order_id}"
    before = {
        "ok": _count(template, "GET", "200"),
        "405": _count(template, "OTHER", "405"),
        "404": _count(UNMATCHED, "GET", "404"),
    }
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for n in range(3):
            assert (await client.get(f"{prefix}/orders/{uuid.uuid4()}?n={n}")).status_code == 200
        assert (await client.request("BREW", f"{prefix}/orders/1")).status_code == 405
        assert (await client.get(f"{prefix}/nowhere/{uuid.uuid4()}")).status_code == 404
        scraped = await client.get("/metrics")
    assert _count(template, "GET", "200") == before["ok"] + 3
    assert _count(template, "OTHER", "405") == before["405"] + 1
    assert _count(UNMATCHED, "GET", "404") == before["404"] + 1
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    assert f'route="{template}"' in scraped.text
    assert f"{prefix}/orders/1" not in scraped.text.replace(template, "")
    assert "/metrics" not in app.openapi()["paths"]
    assert "engine_projection_state" not in scraped.text  # no status sample: no status gauges


async def test_the_api_shows_the_status_gauges_of_the_sample_it_takes() -> None:
    app = FastAPI()
    install_metrics(app)
    sample = Sample(taken_at=0.0, status=_status())
    app.state.context = SimpleNamespace(sampler=_Samples(sample, sample))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        text = (await client.get("/metrics")).text
    assert 'engine_projection_stalled{projection="order_search"} 1.0' in text
    assert "engine_outbox_backlog_events 7.0" in text


def test_workers_counts_are_summed_and_kept_after_they_exit() -> None:
    """Two worker processes count into the directory; the sums survive their exit."""
    count = (
        "from engine import metrics; "
        "metrics.EVENTS_APPLIED.labels('p').inc(5); "
        "metrics.BATCH_APPLY_SECONDS.labels('p', 'redis').observe(0.01)"
    )
    with metrics.workers_directory() as files:
        directory = files.directory
        env = {**os.environ, **files.env}
        for _ in range(2):
            worker = subprocess.Popen([sys.executable, "-c", count], env=env)
            assert worker.wait(timeout=60) == 0
            files.exited(worker.pid)
        text = metrics.render(multiprocess_dir=directory).decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        (applied,) = families["engine_events_applied"].samples
        assert applied.value == 10
        counts = [
            s.value
            for s in families["engine_batch_apply_duration_seconds"].samples
            if s.name.endswith("_count")
        ]
        assert counts == [2]
    assert not Path(directory).exists()
