"""The engine's status, sampled in the background, for health checks, metrics and the live page.

A status collect (:func:`engine.status.collect_status`) costs a few Postgres
queries and Kafka offset requests: cheap once, too much for every probe, every
scrape and every open page at once. :class:`StatusSampler` takes one every
``ops.status_interval_s`` and keeps the last; readers get that sample, never a
collect of their own, so the cost does not grow with the number of watchers.

A sample is taken at most ``ops.status_timeout_s``; one that fails or times
out is kept as a failed sample (its error, no status), so a reader always
knows how old the last good answer is and why the latest is missing. Two
readers that ask for a fresh sample at once share one collect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from engine.lane_state import LaneState
from engine.status import EngineStatus

log = logging.getLogger("engine.health")


@dataclass(frozen=True)
class Sample:
    """One attempt to collect the status: the status, or why there is none."""

    taken_at: float
    """``time.monotonic()`` when the collect finished (or failed)."""
    status: EngineStatus | None
    error: str | None = None


class StatusSampler:
    """Collects the status every ``interval_s`` (``run``) and answers with the last sample."""

    def __init__(
        self,
        collect: Callable[[], Awaitable[EngineStatus]],
        *,
        interval_s: float,
        timeout_s: float,
        stop_grace_s: float = 2.0,
    ) -> None:
        self._collect = collect
        self.interval_s = interval_s
        self._timeout_s = timeout_s
        self._stop_grace_s = stop_grace_s
        self.latest: Sample | None = None
        """The last sample taken, good or failed; None before the first."""
        self.last_good: Sample | None = None
        """The last sample with a status."""
        self._taking: asyncio.Future[Sample] | None = None

    async def sample(self) -> Sample:
        """Take a sample now; concurrent callers share one collect. Never raises."""
        if self._taking is None:
            self._taking = asyncio.ensure_future(self._take())
            self._taking.add_done_callback(self._done)
        # Shielded: one caller cancelled (a client gone) must not cancel the others' collect.
        return await asyncio.shield(self._taking)

    def _done(self, _future: asyncio.Future[Sample]) -> None:
        self._taking = None

    async def _take(self) -> Sample:
        try:
            async with asyncio.timeout(self._timeout_s):
                status = await self._collect()
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if self.latest is None or self.latest.error is None:
                log.warning("cannot collect the engine's status: %s", error)
            taken = Sample(time.monotonic(), None, error)
        else:
            if self.latest is not None and self.latest.error is not None:
                log.info("collecting the engine's status again")
            taken = Sample(time.monotonic(), status)
            self.last_good = taken
        self.latest = taken
        return taken

    async def current(self, max_age_s: float | None = None) -> Sample:
        """The last sample if younger than ``max_age_s`` (default: two intervals), else a new."""
        limit = 2 * self.interval_s if max_age_s is None else max_age_s
        latest = self.latest
        if latest is not None and time.monotonic() - latest.taken_at <= limit:
            return latest
        return await self.sample()

    async def run(self) -> None:
        """Sample every ``interval_s`` until cancelled; a collect in flight ends with it.

        sample() shields the collect from its callers, so the sampler's end must end
        it: the connections it reads through close next. It gets ``stop_grace_s`` to
        finish first, and is cancelled only past that: a Kafka client cancelled while
        it connects can leave its connection open (a process that starts and stops at
        once, as tests do, stops during its first collect).
        """
        loop = asyncio.get_running_loop()
        try:
            while True:
                started = loop.time()
                await self.sample()
                await asyncio.sleep(max(0.0, self.interval_s - (loop.time() - started)))
        finally:
            taking = self._taking
            if taking is not None:
                done, _ = await asyncio.wait({taking}, timeout=self._stop_grace_s)
                if not done:
                    taking.cancel()
                    await asyncio.wait({taking})

    @asynccontextmanager
    async def running(self) -> AsyncIterator[StatusSampler]:
        """Sample in the background inside the block; cancelled (and awaited) on the way out."""
        task = asyncio.create_task(self.run(), name="status sampler")
        try:
            yield self
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


# -- readiness ------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """Why readiness fails: what is wrong (a projection's name, ``relay``, ``status``) and why."""

    component: str
    reason: str


@dataclass(frozen=True)
class Readiness:
    """The verdict of ``/health/ready``: ready, or the problems that stop it."""

    ready: bool
    problems: tuple[Problem, ...]
    sample_age_s: float | None

    def body(self) -> dict[str, object]:
        return {
            "status": "ready" if self.ready else "not ready",
            "problems": [{"component": p.component, "reason": p.reason} for p in self.problems],
            "sample_age_s": None if self.sample_age_s is None else round(self.sample_age_s, 3),
        }


def readiness(
    sample: Sample | None,
    *,
    interval_s: float,
    projections: bool = True,
    relay: bool = True,
    now: float | None = None,
) -> Readiness:
    """Ready unless a projection (``projections``) or the relay (``relay``) is stalled.

    A status that could not be collected for three intervals is a problem too:
    a watcher that cannot see must not answer "all is well".
    """
    now = time.monotonic() if now is None else now
    if sample is None:
        return Readiness(False, (Problem("status", "no status sample taken yet"),), None)
    age = now - sample.taken_at
    problems: list[Problem] = []
    status = sample.status
    if status is None:
        problems.append(Problem("status", f"cannot collect the status: {sample.error}"))
    elif age > 3 * interval_s:
        problems.append(Problem("status", f"the last status sample is {age:.0f}s old"))
    else:
        if projections:
            problems += [
                Problem(p.name, p.state_reason or p.state.value)
                for p in status.projections
                if p.state == LaneState.STALLED
            ]
        if relay and status.outbox.stalled:
            problems.append(Problem("relay", status.outbox.stalled_reason or "stalled"))
    return Readiness(not problems, tuple(problems), age)
