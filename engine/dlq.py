"""Replaying dead letters once their cause is fixed (new code, a fixed store).

A replay writes like a lane: to the projection's current generation, read
under the generation fence (see :mod:`engine.generations`), so a rebuild's
switch cannot slip between reading the generation and writing it.

Parked sequences. A letter that parked its aggregate (the first one) and the
letters parked behind it (see :mod:`engine.postgres.deadletters`) are replayed
together, in order, from the first: asking for any of them replays the whole
sequence. The park row is held ``FOR UPDATE`` for the whole replay, so a lane
that parks another event of the aggregate meanwhile waits for it and then
applies that event itself, or parks it before the replay reads the sequence.

- if the first letter still fails, nothing after it is applied and the outcome
  says so; nothing is marked;
- a letter that fails further on stops the sequence there: the letters before
  it are marked replayed, and it becomes the first letter of the park, so the
  next replay starts from it;
- a letter whose replay changes nothing (every store reports 0 changes: it
  already holds that version or a later one) is a failure, not a success: its
  event would have been folded over, so it is reported and not marked;
- a letter of the same message as one applied earlier in the sequence (its
  event delivered again after it was dead-lettered, and parked behind its own
  first letter) is done with it, not applied again;
- when the whole sequence applied, every letter is marked replayed and the
  aggregate is unparked, in the transaction that held the park row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine import codec
from engine.application import Application
from engine.errors import EngineError
from engine.generations import at_current_generation
from engine.postgres.deadletters import (
    ALL_PROJECTIONS,
    LOCK_TIMEOUT,
    DeadLetter,
    parked_sequence,
)
from engine.postgres.pool import Connection
from engine.projection import Projected, ProjectionStore, RebuildableStore
from engine.resources import Resources


@dataclass(frozen=True)
class ReplayOutcome:
    letter_id: int
    ok: bool
    detail: str


class _NotApplied(Exception):
    """One letter of a replay did not apply: the reason is the message."""


async def replay(
    letter: DeadLetter, application: Application, resources: Resources
) -> ReplayOutcome:
    """Apply ``letter`` again, with the letters parked behind it, in order.

    A letter parked behind another replays the sequence from that first one.
    """
    if letter.replayed_at is not None:
        return ReplayOutcome(letter.id, True, "already replayed: nothing to do")
    first_id = letter.parked_behind or letter.id
    async with resources.pool.acquire() as conn, conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        parks = await conn.fetch(
            "SELECT projection, aggregate_id FROM engine_parked WHERE first_letter = $1 FOR UPDATE",
            first_id,
        )
        sequence = await parked_sequence(conn, first_id)
        if not sequence:
            return ReplayOutcome(first_id, True, "already replayed: nothing to do")
        done, failure = await _apply_in_order(sequence, application, resources)
        await conn.execute(
            "UPDATE engine_dead_letters SET replayed_at = now() WHERE id = ANY($1)", done
        )
        rest = sequence[len(done) :]
        if not rest:
            await conn.execute("DELETE FROM engine_parked WHERE first_letter = $1", first_id)
        elif done and parks:
            await _move_head(conn, first_id, rest)
    aggregate = f" of {sequence[0].aggregate_id}" if parks else ""
    if failure is not None:
        applied = f"applied {len(done)} letter(s){aggregate}, then " if done else ""
        return ReplayOutcome(first_id, False, applied + failure)
    unparked = "; unparked" if parks else ""
    return ReplayOutcome(
        first_id, True, f"applied {len(done)} letter(s){aggregate} in order{unparked}"
    )


async def _apply_in_order(
    sequence: Sequence[DeadLetter], application: Application, resources: Resources
) -> tuple[list[int], str | None]:
    """Apply the letters in order until one fails: the ids applied, and the failure."""
    done: list[int] = []
    # The messages applied so far, and for which projection(s).
    applied: dict[tuple[str, int, int], set[str]] = {}
    for position, step in enumerate(sequence):
        message = (step.topic, step.partition, step.offset)
        if applied.get(message, set()) & {ALL_PROJECTIONS, step.projection}:
            done.append(step.id)  # the same event parked again when delivered again
            continue
        try:
            await _replay_one(step, application, resources)
        except _NotApplied as exc:
            failure = f"letter {step.id}: {exc}"
            if position == 0 and len(sequence) > 1:
                failure += f"; {len(sequence) - 1} letter(s) parked behind it not applied"
            elif len(sequence) > position + 1:
                failure += f"; {len(sequence) - position - 1} after it still parked"
            return done, failure
        applied.setdefault(message, set()).add(step.projection)
        done.append(step.id)
    return done, None


async def _move_head(conn: Connection, old: int, rest: Sequence[DeadLetter]) -> None:
    """The first letter not applied becomes the first of the park; the others wait behind it."""
    head = rest[0]
    await conn.execute("UPDATE engine_dead_letters SET parked_behind = NULL WHERE id = $1", head.id)
    await conn.execute(
        "UPDATE engine_dead_letters SET parked_behind = $2 WHERE parked_behind = $1"
        " AND replayed_at IS NULL",
        old,
        head.id,
    )
    await conn.execute(
        "UPDATE engine_parked SET first_letter = $2,"
        " version = coalesce($3, version) WHERE first_letter = $1",
        old,
        head.id,
        head.aggregate_version,
    )


async def _replay_one(letter: DeadLetter, application: Application, resources: Resources) -> int:
    """Apply one letter to the projection(s) that missed it; the changes the stores made."""
    try:
        envelope = codec.decode(letter.value)
        item = Projected(envelope, application.registry.decode(envelope))
    except EngineError as exc:
        raise _NotApplied(f"still does not decode: {exc}") from exc
    targets = [
        (projection, store)
        for projection, store in application.projections(resources)
        if projection.wants(envelope) and letter.projection in (ALL_PROJECTIONS, projection.name)
    ]
    if not targets:
        raise _NotApplied(f"no projection named {letter.projection!r} wants it")
    changes = 0
    for projection, store in targets:
        try:
            changes += await _apply(resources, projection.name, store, item)
        except Exception as exc:  # the projection's own code may still fail: report it
            raise _NotApplied(f"{projection.name}: {type(exc).__name__}: {exc}") from exc
    if changes == 0:
        names = ", ".join(p.name for p, _ in targets)
        raise _NotApplied(
            f"applied nothing ({names} already hold version {envelope.aggregate_version}"
            f" of {envelope.aggregate_id} or a later one): not marked replayed"
        )
    return changes


async def _apply(resources: Resources, name: str, store: ProjectionStore, item: Projected) -> int:
    """Apply to the *current* generation, inside the fence, like a lane.

    The store objects an application builds are at generation 1; written as
    they are after a rebuild, a replay would recreate a dropped generation
    and write where no reader looks.
    """
    if not isinstance(store, RebuildableStore):
        await store.setup()
        return await store.apply([item])
    async with at_current_generation(resources.settings.postgres, name, store) as current:
        return await current.apply([item])
