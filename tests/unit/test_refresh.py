"""The coalescing refresher: bounded in count and in time, never failing the writer.

The client is a stand-in that counts refreshes and can be told to be slow or
to fail; against the real daemon and index see
``tests/integration/read/test_search_refresh.py``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import pytest
from elasticsearch import AsyncElasticsearch, ConnectionError

from engine.stores.refresh import CoalescingRefresher, IntervalRefresh, refresher


class _Indices:
    def __init__(self, takes_s: float, fails: bool) -> None:
        self.takes_s = takes_s
        self.fails = fails
        self.started = 0
        self.in_flight = 0
        self.most_in_flight = 0

    async def refresh(self, index: str) -> None:
        self.started += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.takes_s)
            if self.fails:
                raise ConnectionError("refused")
        finally:
            self.in_flight -= 1


def _client(takes_s: float = 0.0, fails: bool = False) -> tuple[AsyncElasticsearch, _Indices]:
    indices = _Indices(takes_s, fails)
    client = type("Client", (), {"indices": indices})()
    return cast(AsyncElasticsearch, client), indices


async def _idle(refresher: CoalescingRefresher) -> None:
    task: Any = refresher._task
    if task is not None:
        await task


def test_the_policy_picks_the_refresher() -> None:
    client, _ = _client()
    assert isinstance(refresher(client, "i", None), IntervalRefresh)
    assert isinstance(refresher(client, "i", 0.1), CoalescingRefresher)


async def test_writes_during_a_refresh_are_covered_by_one_more() -> None:
    client, indices = _client(takes_s=0.05)
    coalescing = CoalescingRefresher(client, "i", min_gap_s=0.0)
    coalescing.written()
    await asyncio.sleep(0.01)  # the first refresh is in flight
    for _ in range(50):
        coalescing.written()
    await _idle(coalescing)
    assert (indices.started, indices.most_in_flight, coalescing.refreshes) == (2, 1, 2)


async def test_refreshes_start_at_most_once_per_gap() -> None:
    client, indices = _client()
    coalescing = CoalescingRefresher(client, "i", min_gap_s=0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    while loop.time() - started < 0.35:  # a writer far faster than the gap
        coalescing.written()
        await asyncio.sleep(0.005)
    await _idle(coalescing)
    assert 3 <= indices.started <= 5


async def test_a_failed_refresh_is_logged_once_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    client, indices = _client(fails=True)
    coalescing = CoalescingRefresher(client, "i", min_gap_s=0.0)
    with caplog.at_level(logging.WARNING, "engine.stores.refresh"):
        for _ in range(3):
            coalescing.written()
            await _idle(coalescing)
    assert indices.started == 3 and coalescing.refreshes == 0
    assert [r.getMessage()[:16] for r in caplog.records] == ["cannot refresh i"]
    indices.fails = False
    coalescing.written()
    await _idle(coalescing)
    assert coalescing.refreshes == 1


async def test_close_lets_a_quick_refresh_finish_and_cancels_a_hung_one() -> None:
    client, indices = _client(takes_s=0.05)
    quick = CoalescingRefresher(client, "i", min_gap_s=0.0, close_timeout_s=5.0)
    quick.written()
    await quick.close()
    assert quick.refreshes == 1
    client, indices = _client(takes_s=60.0)
    hung = CoalescingRefresher(client, "i", min_gap_s=0.0, close_timeout_s=0.1)
    hung.written()
    await asyncio.wait_for(hung.close(), timeout=5)
    assert (hung.refreshes, indices.in_flight) == (0, 0)
