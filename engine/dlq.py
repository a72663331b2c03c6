"""Replaying dead letters once their cause is fixed (new code, a fixed store).

A replay writes like a lane: to the projection's current generation, read
under the generation fence (see :mod:`engine.generations`), so a rebuild's
switch cannot slip between reading the generation and writing it.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine import codec
from engine.application import Application
from engine.errors import EngineError
from engine.generations import at_current_generation
from engine.postgres.deadletters import ALL_PROJECTIONS, DeadLetter, DeadLetterStore
from engine.projection import Projected, ProjectionStore, RebuildableStore
from engine.resources import Resources


@dataclass(frozen=True)
class ReplayOutcome:
    letter_id: int
    ok: bool
    detail: str


async def replay(
    letter: DeadLetter, application: Application, resources: Resources
) -> ReplayOutcome:
    """Decode the original bytes again and apply them to the projection(s) that missed them."""
    try:
        envelope = codec.decode(letter.value)
        item = Projected(envelope, application.registry.decode(envelope))
    except EngineError as exc:
        return ReplayOutcome(letter.id, False, f"still does not decode: {exc}")
    targets = [
        (projection, store)
        for projection, store in application.projections(resources)
        if projection.wants(envelope) and letter.projection in (ALL_PROJECTIONS, projection.name)
    ]
    if not targets:
        return ReplayOutcome(
            letter.id, False, f"no projection named {letter.projection!r} wants it"
        )
    for projection, store in targets:
        try:
            await _apply(resources, projection.name, store, item)
        except Exception as exc:  # the projection's own code may still fail: report it
            return ReplayOutcome(
                letter.id, False, f"{projection.name}: {type(exc).__name__}: {exc}"
            )
    await DeadLetterStore(resources.pool).mark_replayed(letter.id)
    names = ", ".join(p.name for p, _ in targets)
    return ReplayOutcome(letter.id, True, f"applied to {names}")


async def _apply(resources: Resources, name: str, store: ProjectionStore, item: Projected) -> None:
    """Apply to the *current* generation, inside the fence, like a lane.

    The store objects an application builds are at generation 1; written as
    they are after a rebuild, a replay would recreate a dropped generation
    and write where no reader looks.
    """
    if not isinstance(store, RebuildableStore):
        await store.setup()
        await store.apply([item])
        return
    async with at_current_generation(resources.settings.postgres, name, store) as current:
        await current.apply([item])
