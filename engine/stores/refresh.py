"""When a document the daemon wrote becomes searchable: the search index's refresh policy.

Elasticsearch answers a real-time get (the store's own ``_mget``) with a write
at once, but a *search* sees only what the index has refreshed. So search
visibility lag is the daemon's lag plus the wait for the next refresh, and the
engine offers two policies (``ENGINE_ELASTICSEARCH__REFRESH``):

- ``interval``: the index refreshes on its own every ``refresh_interval``.
  The cheapest under heavy write load (one refresh per interval, whatever the
  rate), but a write waits up to a whole interval to be searchable.
- ``after_write``: after each bulk it wrote, the store asks for a refresh of
  the index (:class:`CoalescingRefresher`). At low and moderate rates a write
  is searchable one batch plus one refresh after it arrives; under load the
  cost stays bounded, because requests are coalesced: at most one refresh is
  in flight, at most one starts per ``refresh_min_gap_ms``, and any number of
  bulks written meanwhile are covered by the next one.

Why not ``refresh=wait_for`` (or ``refresh=true``) on the bulk itself: the
lane would wait inside its store call, for up to a whole interval with
``wait_for``, for a refresh per batch of every lane with ``true``; both slow
projection, not just search. The refresher runs beside the lane and never
holds it up: :meth:`CoalescingRefresher.written` only sets a flag and, if no
refresh task is running, starts one.

Why a coalesced refresh covers every write before it: the store calls
``written`` after the bulk's answer, when the documents are indexed; the task
clears the flag *before* it sends the refresh, and a refresh makes visible
everything indexed before it started. A bulk answered while a refresh is in
flight sets the flag again, so one more refresh follows it.

Why a failed refresh is only logged: a refresh changes no data, only what
searches see. The index keeps its ``refresh_interval`` under both policies, as
a backstop, so a document whose refresh failed still becomes searchable
within the interval; raising would fail a batch that was written correctly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from elasticsearch import AsyncElasticsearch

log = logging.getLogger("engine.stores.refresh")


class Refresher(Protocol):
    """What the store says about its writes; making them searchable is the refresher's job."""

    def written(self) -> None:
        """A bulk was written to the index (call after its answer)."""

    async def close(self) -> None:
        """Stop, after the refresh owed to the last writes if it comes soon (bounded)."""


class IntervalRefresh:
    """The ``interval`` policy: nothing to do, the index refreshes on its own."""

    def written(self) -> None:
        return None

    async def close(self) -> None:
        return None


class CoalescingRefresher:
    """The ``after_write`` policy: refresh ``index`` soon after writes, bounded in cost.

    At most one refresh in flight, at most one started per ``min_gap_s``; the
    writes made while one waits or runs are covered by the next (module doc).
    """

    def __init__(
        self,
        client: AsyncElasticsearch,
        index: str,
        min_gap_s: float,
        *,
        close_timeout_s: float = 5.0,
    ) -> None:
        self._client = client
        self._index = index
        self._min_gap_s = min_gap_s
        self._close_timeout_s = close_timeout_s
        self._pending = False
        self._last_start = -min_gap_s
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.refreshes = 0

    def written(self) -> None:
        self._pending = True
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"refresh {self._index}")

    async def _run(self) -> None:
        while self._pending:
            wait = self._last_start + self._min_gap_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            # Cleared before the request: a write answered from here on needs the next refresh.
            self._pending = False
            self._last_start = time.monotonic()
            await self._refresh()

    async def _refresh(self) -> None:
        try:
            await self._client.indices.refresh(index=self._index)
        except Exception as exc:  # nothing is lost (module doc); CancelledError passes
            if not self._failing:
                log.warning("cannot refresh %s (the index's interval will): %s", self._index, exc)
            self._failing = True
            return
        if self._failing:
            log.info("refreshing %s again", self._index)
        self._failing = False
        self.refreshes += 1

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is None or task.done():
            return
        # A daemon that stops (or a burst that caught up) leaves its last writes
        # searchable if the refresh owed to them answers within the bound; past
        # it, the index's own interval makes them so.
        await asyncio.wait([task], timeout=self._close_timeout_s)
        if not task.done():
            task.cancel()
            # wait() neither raises the task's CancelledError nor swallows our own.
            await asyncio.wait([task])


def refresher(client: AsyncElasticsearch, index: str, after_write_gap_s: float | None) -> Refresher:
    """The refresher of a policy: ``None`` is ``interval``, a gap in seconds is ``after_write``."""
    if after_write_gap_s is None:
        return IntervalRefresh()
    return CoalescingRefresher(client, index, after_write_gap_s)
