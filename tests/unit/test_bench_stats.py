"""The benchmark harness's pure parts: figures, ratios, targets, the markdown report, the data."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest

from bench.cli import overload_notes
from bench.data import EventStream
from bench.lag import request_for, sustained
from bench.report import fmt, render_markdown, table, targets
from bench.stats import percentile, rate, ratio, slowest, summarize, windows
from bench.targets import pg_value
from projections.orders import CancelOrder, ConfirmOrder, CreateOrder


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert percentile(values, 0) == 15.0
    assert percentile(values, 100) == 50.0
    assert percentile(values, 50) == 35.0
    assert percentile(values, 40) == pytest.approx(29.0)  # rank 1.6: 20 + 0.6 * 15
    assert percentile(list(reversed(values)), 40) == pytest.approx(29.0)  # order does not matter


def test_percentile_of_one_value_is_that_value() -> None:
    assert percentile([7.5], 99) == 7.5


@pytest.mark.parametrize("q", [-1, 101])
def test_percentile_refuses_a_rank_outside_0_100(q: float) -> None:
    with pytest.raises(ValueError, match="between 0 and 100"):
        percentile([1.0], q)


def test_percentile_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_summarize_reports_count_mean_percentiles_and_max() -> None:
    summary = summarize([float(n) for n in range(1, 101)])
    assert summary["count"] == 100
    assert summary["mean"] == pytest.approx(50.5)
    assert summary["p50"] == pytest.approx(50.5)
    assert summary["p95"] == pytest.approx(95.05)
    assert summary["p99"] == pytest.approx(99.01)
    assert summary["max"] == 100.0


def test_summarize_of_nothing_is_all_zero() -> None:
    assert summarize([]) == {
        "count": 0,
        "mean": 0.0,
        "max": 0.0,
        "p50": 0.0,
        "p95": 0.0,
        "p99": 0.0,
    }


def test_rate_and_ratio() -> None:
    assert rate(1000, 4.0) == 250.0
    assert rate(1000, 0.0) == 0.0
    assert ratio(3.0, 4.0) == 0.75
    assert ratio(3.0, 0.0) is None
    assert ratio(None, 4.0) is None
    assert ratio(3.0, None) is None


def test_slowest_rate_bounds_the_pipeline_and_ignores_unmeasured_ones() -> None:
    assert slowest({"kafka": 50_000.0, "postgres": 9_000.0, "redis": 0.0}) == ("postgres", 9_000.0)
    with pytest.raises(ValueError, match="no positive rate"):
        slowest({"redis": 0.0})


def test_windows_group_points_by_second_in_time_order() -> None:
    points = [(2.5, 30.0), (0.1, 10.0), (0.9, 20.0), (2.0, 40.0)]
    assert windows(points) == [(0.0, [10.0, 20.0]), (2.0, [30.0, 40.0])]
    assert windows(points, width_s=5.0) == [(0.0, [30.0, 10.0, 20.0, 40.0])]
    with pytest.raises(ValueError, match="positive width"):
        windows(points, width_s=0)


def test_fmt_and_table() -> None:
    assert fmt(None) == "-"
    assert fmt(True) == "yes"
    assert fmt(12345.678) == "12,346"
    assert fmt(0.4567, 2) == "0.46"
    assert fmt("text") == "text"
    assert table(["a", "b"], [["1", "2"], ["3", "4"]]) == (
        "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |"
    )


def _lag(p50: float, p99: float) -> dict[str, Any]:
    return {"count": 10, "p50": p50, "p95": p99, "p99": p99, "max": p99, "not_visible": 0}


def _results() -> dict[str, Any]:
    engine = {
        "events_per_s": 5000.0,
        "startup_s": 1.5,
        "daemon_peak_rss_mb": 250.0,
        "verified": {"ok": True},
    }
    ceiling = {
        "kafka_consume_per_s": 80_000.0,
        "postgres_per_s": 10_000.0,
        "redis_per_s": 30_000.0,
        "elasticsearch_per_s": 20_000.0,
        "all_stores_in_sequence_per_s": 5_500.0,
        "decode_per_s": 20_000.0,
        "slowest": "postgres",
    }
    return {
        "started_at": "2026-01-01T00:00:00+00:00",
        "machine": {"cpu_count": 2, "python": "3.11", "load_start": [1.0], "load_end": [2.0]},
        "duration_s": 300.0,
        "notes": ["rebuild: smaller than the issue's size"],
        "benchmarks": {
            "throughput": {
                "events": 200_000,
                "orders": 57_000,
                "engine": engine,
                "ceiling": ceiling,
                "baseline": {"events_per_s": 200.0},
                "ratios": {"engine_over_ceiling": 0.5, "engine_over_baseline": 25.0},
                "workers": {
                    "2": {
                        "engine": {**engine, "daemon_peak_rss_mb": 150.0},
                        "ratios": {
                            "engine_over_ceiling": 0.6,
                            "engine_over_baseline": 31.0,
                            "engine_over_all_stores_in_sequence": 1.1,
                        },
                    }
                },
            },
            "lag": {
                "rate": 500.0,
                "duration_s": 30.0,
                "commands": {
                    "sent": 15_000,
                    "achieved_per_s": 490.0,
                    "skipped_over_in_flight_cap": 0,
                    "latency_ms": {"p50": 12.0, "p99": 80.0},
                },
                "lag_from": "the answer",
                "lag_ms": {"postgres": _lag(120.0, 900.0), "elasticsearch": _lag(600.0, 1300.0)},
                "applied_lag_ms": {"order_details": _lag(100.0, 800.0)},
                "daemon_peak_rss_mb": 320.0,
            },
        },
    }


def test_targets_compare_each_figure_with_the_issue() -> None:
    found = {t["target"]: (t["measured"], t["met"]) for t in targets(_results())}
    assert found["throughput (1 worker) / slowest store's ceiling"] == (0.5, True)
    assert found["throughput (1 worker) / naive baseline"] == (25.0, False)
    assert found["throughput (1 worker) / the 3 stores one after the other"] == (None, None)
    assert found["throughput (2 workers) / the 3 stores one after the other"] == (1.1, True)
    assert found["lag p99, postgres"] == (900.0, True)
    assert found["lag p50, postgres"] == (120.0, True)
    assert found["lag p99, elasticsearch"] == (1300.0, False)
    assert found["lag p50, elasticsearch"] == (600.0, False)
    assert found["daemon peak RSS per process (MB)"] == (320.0, False)  # the worst run counts


def test_targets_of_a_run_without_benchmarks_are_empty() -> None:
    assert targets({"benchmarks": {}}) == []


def test_markdown_has_a_section_per_benchmark_run_and_the_targets() -> None:
    text = render_markdown(_results())
    assert text.startswith("# Benchmark results, 2026-01-01")
    assert "- rebuild: smaller than the issue's size" in text
    assert "## Targets" in text
    assert "| throughput (1 worker) / naive baseline | >= 30x | 25.00 | no |" in text
    assert "| engine, 2 workers |" in text
    assert "## 1. Projection throughput (200,000 events, 57,000 orders)" in text
    assert "| engine, 1 worker (all 5 projections, 3 stores) | 5,000 |" in text
    assert "engine / slowest ceiling (postgres) = 0.50" in text
    assert "## 2. End-to-end lag (500 commands/s for 30 s)" in text
    assert "| elasticsearch | 600.0 | 1,300.0 | 1,300.0 | 1,300.0 | 0 |" in text
    assert "## 6. Peak memory of the daemon (RSS)" in text
    assert "## 3. Outbox relay" not in text  # not run: no section


def test_pg_value_converts_document_values_for_copy() -> None:
    assert pg_value(None, "integer") is None
    assert pg_value("12.50", "numeric(14,2)") == Decimal("12.50")
    assert pg_value([{"a": 1}], "jsonb") == '[{"a": 1}]'
    at = datetime(2025, 3, 1, 12, tzinfo=UTC)
    assert pg_value(at.isoformat(), "timestamp with time zone") == at
    assert pg_value(at, "date") == date(2025, 3, 1)
    assert pg_value(3, "text") == "3"


def test_event_stream_is_reproducible_and_every_aggregate_in_version_order() -> None:
    first = [item.envelope for item in EventStream(600, seed=3)]
    again = [item.envelope for item in EventStream(600, seed=3)]
    assert first == again
    assert len(first) == 600
    assert [e.position for e in first] == list(range(1, 601))
    versions: dict[str, int] = {}
    for envelope in first:
        assert envelope.aggregate_version == versions.get(envelope.aggregate_id, 0) + 1
        versions[envelope.aggregate_id] = envelope.aggregate_version
    times = [e.occurred_at for e in first if e.aggregate_type == "order"]
    assert times == sorted(times)  # the shop's timeline, orders interleaved
    types = Counter(e.event_type for e in first)
    assert {"OrderCreated", "OrderConfirmed", "OrderShipped", "OrderDelivered"} <= set(types)


def test_event_stream_order_ids_are_the_orders_that_appear() -> None:
    stream = EventStream(300, seed=5)
    created = {i.aggregate_id for i in stream if i.envelope.event_type == "OrderCreated"}
    assert stream.order_ids == sorted(created)


def test_each_command_maps_to_its_api_call() -> None:
    order_id = "0f8d4c52-7e0b-4c7e-9d51-3a6f2b9e8c11"
    confirm = ConfirmOrder.model_validate({"order_id": order_id})
    method, path, body = request_for(confirm)
    assert (method, path) == ("POST", f"/orders/{order_id}/confirm")
    assert body == {"command_id": str(confirm.command_id)}
    cancel = CancelOrder.model_validate({"order_id": order_id, "reason": "too late"})
    assert request_for(cancel)[2]["reason"] == "too late"
    create = CreateOrder.model_validate(
        {
            "customer_id": order_id,
            "items": [{"product_id": order_id, "quantity": 2}],
            "shipping_address": {
                "street": "1 Main St",
                "city": "Oslo",
                "postal_code": "0150",
                "country": "Norway",
            },
        }
    )
    method, path, body = request_for(create)
    assert (method, path) == ("POST", "/orders")
    assert body["items"] == [{"product_id": order_id, "quantity": 2}]
    assert "order_id" not in body  # None is left out: the domain chooses it


def test_an_overloaded_lag_run_is_called_so() -> None:
    lag = _results()["benchmarks"]["lag"]
    assert overload_notes({"lag": lag}) == []  # 490 of 500 commands/s: sustained
    slow = {**lag, "commands": {**lag["commands"], "achieved_per_s": 112.0}}
    [note] = overload_notes({"lag": slow})
    assert "could not sustain 500 commands/s" in note
    assert "achieved 112/s" in note
    assert overload_notes({}) == []


def test_search_visibility_is_judged_only_at_a_sustained_rate() -> None:
    results = _results()
    lag = results["benchmarks"]["lag"]
    policy = {"policy": "after_write", "refresh_interval": "1s", "min_gap_ms": 100}
    lag.update(sustained=True, search_refresh=policy)
    lag["lag_ms"]["elasticsearch"] = _lag(150.0, 420.0)
    found = {t["target"]: t for t in targets(results)}["search visibility lag p99"]
    assert (found["measured"], found["met"]) == (420.0, True)
    assert found["wanted"] == "< 500 ms at a sustained rate (500/s, refresh after_write)"
    text = render_markdown(results)
    assert "Rate sustained: yes. Search refresh policy: after_write (at most one refresh" in text
    lag["sustained"] = False
    found = {t["target"]: t for t in targets(results)}["search visibility lag p99"]
    assert found["met"] is None  # an overloaded run's lag measures a queue, not the policy
    assert "Rate sustained: NO" in render_markdown(results)


def test_a_lag_run_is_sustained_only_without_queueing() -> None:
    commands = _results()["benchmarks"]["lag"]["commands"]
    assert sustained(500.0, commands)
    assert not sustained(500.0, {**commands, "achieved_per_s": 400.0})
    assert not sustained(500.0, {**commands, "skipped_over_in_flight_cap": 3})
    assert not sustained(500.0, {**commands, "latency_ms": {"p50": 900.0, "p99": 2000.0}})
