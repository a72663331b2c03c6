"""Benchmark 5: rebuilding each projection from the event log.

``events`` events are copied into the event log (COPY), every projection's
first generation is set up empty, and then each projection is rebuilt in turn
with the engine's own rebuild (``engine.rebuild.rebuild``, what ``engine
rebuild NAME`` runs): read the log in chunks, fold into a new generation,
switch readers, drop the old one. It runs in this process with no daemon
beside it; the time is the whole rebuild, switch included.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import isolated, mb, say
from bench.data import EventStream, copy_to_log
from bench.stats import rate
from engine import Settings, open_resources
from engine.rebuild import rebuild
from projections.orders import APP


@dataclass(frozen=True)
class RebuildConfig:
    events: int
    seed: int = 41


def _peak_rss() -> int:
    """This process's peak RSS so far (the rebuild runs here)."""
    import resource  # noqa: PLC0415 - Unix only, and only needed here

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def run_rebuild(base: Settings, config: RebuildConfig, out: Path) -> dict[str, Any]:
    del out  # nothing to write beside the results
    async with isolated(base, "rebuild") as env, open_resources(env.settings) as resources:
        say(f"rebuild: copying {config.events:,} events into the event log")
        started = time.perf_counter()
        async with resources.pool.acquire() as conn:
            await copy_to_log(conn, EventStream(config.events, config.seed), outbox=False)
        load_s = time.perf_counter() - started
        pairs = APP.projections(resources)
        for _, store in pairs:
            await store.setup()
        figures: dict[str, Any] = {}
        for projection, _ in pairs:
            started = time.perf_counter()
            report = await rebuild(APP, resources, projection.name, lambda _done, _total: None)
            seconds = time.perf_counter() - started
            figures[projection.name] = {
                "seconds": seconds,
                "replayed": report.replayed,
                "replayed_per_s": rate(report.replayed, seconds),
                "log_events_per_s": rate(config.events, seconds),
            }
            say(
                f"  {projection.name:>18}: {seconds:.1f}s ({report.replayed:,} events replayed, "
                f"{rate(report.replayed, seconds):,.0f}/s)"
            )
    return {
        "events": config.events,
        "load": {"path": "COPY into engine_event_log", "seconds": load_s},
        "projections": figures,
        "total_s": sum(f["seconds"] for f in figures.values()),
        "harness_peak_rss_mb": mb(_peak_rss()),
    }
