"""Replaying dead letters once their cause is fixed (new code, a fixed store)."""

from __future__ import annotations

from dataclasses import dataclass

from engine import codec
from engine.application import Application
from engine.errors import EngineError
from engine.postgres.deadletters import ALL_PROJECTIONS, DeadLetter, DeadLetterStore
from engine.projection import Projected
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
        await store.setup()
        try:
            await store.apply([item])
        except Exception as exc:  # the projection's own code may still fail: report it
            return ReplayOutcome(
                letter.id, False, f"{projection.name}: {type(exc).__name__}: {exc}"
            )
    await DeadLetterStore(resources.pool).mark_replayed(letter.id)
    names = ", ".join(p.name for p, _ in targets)
    return ReplayOutcome(letter.id, True, f"applied to {names}")
