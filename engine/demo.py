"""The seam for ``engine demo``: an application may bring a loader of sample data.

The engine knows nothing of the domain: it hands the loader a CommandBus, the
sizes asked for, a seed, a concurrency bound and a progress callback, and prints
the summary the loader returns. The loader only writes (commands, so events go
to the outbox); the relay and the daemon publish and project them as usual.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from engine.commands import CommandBus

DemoProgress = Callable[[int, int], None]  # (commands done, commands in total)


@dataclass(frozen=True)
class DemoSize:
    """How big a sample to load."""

    customers: int
    orders: int


@dataclass(frozen=True)
class DemoSummary:
    """What a loader did and what the sample holds, ready for JSON."""

    seed: int
    commands: int  # commands issued
    new: int  # of which changed the write model
    duplicates: int  # of which had been applied before (same command id): nothing recorded
    counts: Mapping[str, int] = field(default_factory=dict)  # e.g. {"customers": 2000}
    breakdowns: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    samples: Mapping[str, str] = field(default_factory=dict)  # ids for example queries


class DemoLoader(Protocol):
    """Issues the commands of a reproducible sample; the same seed gives the same sample."""

    def __call__(
        self,
        bus: CommandBus,
        size: DemoSize,
        seed: int,
        concurrency: int,
        progress: DemoProgress,
    ) -> Awaitable[DemoSummary]: ...
