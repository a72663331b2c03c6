"""When does a committed event become visible? Pollers that ask each store directly.

For every event a command produced (order id, version, partition, position,
and the moment the API's 2xx answer arrived, which is after the commit), one
poller per store asks the store itself, every few milliseconds and for all
events still unseen at once:

- ``postgres``: the ``order_details`` view has the order at that version or later;
- ``redis``: the quick-lookup hash's ``_v`` field is at that version or later;
- ``elasticsearch``: a *search* (not a real-time get: what a user's search
  sees, so after a refresh) finds the order's document at that version or later.

A fourth poller reads ``engine_partition_progress`` and notes when each of the
five projections reported the event's position on its partition as applied.

The time an event is first seen is the end of the poll that saw it, so every
lag is an upper bound, by at most one poll interval plus the poll itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from engine import Resources
from engine.stores.redis import generation_prefix
from projections.orders.wiring import quick_lookup_prefix, search_alias

STORES = ("postgres", "redis", "elasticsearch")


@dataclass
class Event:
    """One event a command produced, and when each store first showed it."""

    order_id: str
    version: int
    partition: int
    position: int
    sent_at: float
    acked_at: float
    seen: dict[str, float] = field(default_factory=dict)


Versions = dict[str, int]  # order id -> version the store holds


class Tracker:
    """Events waiting to be seen, per store and per projection."""

    def __init__(self, projections: Sequence[str]) -> None:
        self.events: list[Event] = []
        self.projections = list(projections)
        self._waiting: dict[str, dict[str, list[Event]]] = {s: {} for s in STORES}
        self._applied: dict[str, list[Event]] = {p: [] for p in self.projections}

    def add(self, event: Event) -> None:
        self.events.append(event)
        for store in STORES:
            self._waiting[store].setdefault(event.order_id, []).append(event)
        for projection in self.projections:
            self._applied[projection].append(event)

    def waiting_ids(self, store: str) -> list[str]:
        return list(self._waiting[store])

    def saw(self, store: str, versions: Versions, at: float) -> None:
        """The store holds these versions (as of ``at``): everything up to them is visible."""
        waiting = self._waiting[store]
        for order_id, version in versions.items():
            events = waiting.get(order_id)
            if not events:
                continue
            still = []
            for event in events:
                if event.version <= version:
                    event.seen.setdefault(store, at)
                else:
                    still.append(event)
            if still:
                waiting[order_id] = still
            else:
                del waiting[order_id]

    def applied(self, progress: dict[tuple[str, int], int], at: float) -> None:
        """Per (projection, partition), the highest position applied (as of ``at``)."""
        for projection, events in self._applied.items():
            still = []
            for event in events:
                if progress.get((projection, event.partition), 0) >= event.position:
                    event.seen.setdefault(projection, at)
                else:
                    still.append(event)
            self._applied[projection] = still

    def pending(self) -> int:
        stores = sum(len(events) for w in self._waiting.values() for events in w.values())
        return stores + sum(len(events) for events in self._applied.values())


Poll = Callable[[list[str]], Awaitable[Versions]]


class Pollers:
    """One task per store plus one for the progress table, until stopped."""

    def __init__(self, resources: Resources, tracker: Tracker, every_s: float = 0.01) -> None:
        self._resources = resources
        self._tracker = tracker
        self._every_s = every_s
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._quick = generation_prefix(quick_lookup_prefix(resources), 1)
        self._alias = search_alias(resources)
        self.polls: dict[str, int] = {}

    def start(self) -> None:
        polls: dict[str, tuple[Poll, float]] = {
            "postgres": (self._postgres, self._every_s),
            "redis": (self._redis, self._every_s),
            # A search per poll costs Elasticsearch more: a little less often.
            "elasticsearch": (self._elasticsearch, self._every_s * 2.5),
        }
        self._tasks = [
            asyncio.create_task(self._loop(store, poll, every))
            for store, (poll, every) in polls.items()
        ]
        self._tasks.append(asyncio.create_task(self._progress_loop()))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _loop(self, store: str, poll: Poll, every_s: float) -> None:
        while not self._stop.is_set():
            ids = self._tracker.waiting_ids(store)
            if ids:
                versions = await poll(ids)
                self._tracker.saw(store, versions, time.perf_counter())
                self.polls[store] = self.polls.get(store, 0) + 1
            await asyncio.sleep(every_s)

    async def _progress_loop(self) -> None:
        topic = self._resources.settings.kafka.topic
        while not self._stop.is_set():
            rows = await self._resources.pool.fetch(
                "SELECT projection, partition, position FROM engine_partition_progress"
                " WHERE topic = $1",
                topic,
            )
            self._tracker.applied(
                {(r["projection"], r["partition"]): r["position"] for r in rows},
                time.perf_counter(),
            )
            await asyncio.sleep(self._every_s)

    async def _postgres(self, ids: list[str]) -> Versions:
        rows = await self._resources.pool.fetch(
            "SELECT id, version FROM order_details WHERE id = ANY($1::text[])", ids
        )
        return {row["id"]: row["version"] for row in rows}

    async def _redis(self, ids: list[str]) -> Versions:
        async with self._resources.redis.pipeline(transaction=False) as pipe:
            for order_id in ids:
                pipe.hget(self._quick + order_id, "_v")
            found = await pipe.execute()
        return {order_id: int(v) for order_id, v in zip(ids, found, strict=True) if v is not None}

    async def _elasticsearch(self, ids: list[str]) -> Versions:
        versions: Versions = {}
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            found = await self._resources.elasticsearch.search(
                index=self._alias,
                query={"ids": {"values": chunk}},
                size=len(chunk),
                source_includes=["_v"],
            )
            for hit in found["hits"]["hits"]:
                versions[hit["_id"]] = int(hit["_source"]["_v"])
        return versions
