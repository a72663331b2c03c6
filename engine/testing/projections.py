"""Running a projection over a test stream: in memory through the engine's fold, or in a store.

The in-memory path calls :func:`engine.projection.fold`, the very function the
Postgres document store and the compare-and-set stores (Redis, Elasticsearch)
run on each batch, with the same filtering the daemon's lane applies
(``projection.wants``). What it cannot reproduce is how a store gives a
document back between batches (Postgres columns, Redis strings); pass
``stored_as=as_redis_hash`` to fold through the Redis representation, and use
:func:`project_into` with the real store for everything else, and for
:class:`~engine.SqlProjection`, which has no in-memory form.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from engine.projection import Document, DocumentProjection, Projected, Projection, ProjectionStore
from engine.projection import fold as engine_fold
from engine.stores.redis import to_field

# What a store gives back for a document it was given (identity when None).
StoredAs = Callable[[Document], Document]
_State = dict[str, tuple[Document | None, int]]


def as_redis_hash(doc: Document) -> Document:
    """The document as ``RedisHashStore`` stores and returns it: text fields, no None."""
    return {key: to_field(value) for key, value in doc.items() if value is not None}


def project(
    projection: DocumentProjection,
    events: Iterable[Projected],
    *,
    batch_size: int | None = None,
    stored_as: StoredAs | None = None,
) -> dict[str, Document]:
    """The documents, by aggregate id, after folding ``events`` (all in one batch by default)."""
    items = _wanted(_document_projection(projection), events)
    return _documents(_fold(projection, {}, items, batch_size, stored_as))


def assert_idempotent(
    projection: DocumentProjection,
    events: Iterable[Projected],
    *,
    stored_as: StoredAs | None = None,
) -> dict[str, Document]:
    """Prove that redelivery and batching cannot change the result; return the documents.

    Compares folding every event once against: folding again from scratch (a
    projection that reads the clock or random numbers fails here), one event
    per batch, and, for every prefix of the stream, folding the prefix then
    redelivering everything (a consumer restarted before its commit), and
    folding everything then redelivering the prefix (a stale batch from a
    consumer that lost its partition: it must not roll a document back).
    Raises AssertionError naming the case and the fields that differ.
    """
    items = _wanted(_document_projection(projection), events)
    once = _fold(projection, {}, items, None, stored_as)
    cases: list[tuple[str, _State]] = [
        ("folding the events again from scratch", _fold(projection, {}, items, None, stored_as)),
        ("folding one event per batch", _fold(projection, {}, items, 1, stored_as)),
    ]
    for cut in range(1, len(items) + 1):
        prefix = _fold(projection, {}, items[:cut], None, stored_as)
        cases += [
            (
                f"folding the first {cut} event(s), then redelivering all {len(items)}",
                _fold(projection, prefix, items, None, stored_as),
            ),
            (
                f"folding all {len(items)} events, then redelivering the first {cut}",
                _fold(projection, once, items[:cut], None, stored_as),
            ),
        ]
    for case, state in cases:
        _assert_same(projection.name, case, once, state)
    return _documents(once)


async def project_into(
    pair: tuple[Projection, ProjectionStore],
    events: Iterable[Projected],
    *,
    batch_size: int = 100,
    setup: bool = True,
) -> int:
    """Set the store up and apply ``events`` in batches, as the daemon's lane does.

    Only the events the projection ``wants`` are applied. Returns how many
    changes the store reported: applying the same events again must return 0.
    """
    projection, store = pair
    if setup:
        await store.setup()
    changed = 0
    for batch in _batches(_wanted(projection, events), batch_size):
        changed += await store.apply(batch)
    return changed


def _document_projection(projection: Any) -> DocumentProjection:
    if not isinstance(projection, DocumentProjection):
        raise TypeError(
            f"{type(projection).__name__} is not a DocumentProjection and has no in-memory"
            " fold: apply it to its real store with project_into((projection, store), events)"
        )
    return projection


def _wanted(projection: Projection, events: Iterable[Projected]) -> list[Projected]:
    return [item for item in events if projection.wants(item.envelope)]


def _batches(items: Sequence[Projected], size: int | None) -> Iterator[Sequence[Projected]]:
    step = size or max(len(items), 1)
    for start in range(0, len(items), step):
        yield items[start : start + step]


def _fold(
    projection: DocumentProjection,
    state: _State,
    items: Sequence[Projected],
    batch_size: int | None,
    stored_as: StoredAs | None,
) -> _State:
    """Fold batch after batch, each from what the store would give back after the last."""
    result = dict(state)
    for batch in _batches(items, batch_size):
        for key, (doc, version) in engine_fold(projection, result, batch).items():
            result[key] = (stored_as(doc) if stored_as else doc, version)
    return result


def _documents(state: _State) -> dict[str, Document]:
    return {key: doc for key, (doc, _version) in state.items() if doc is not None}


def _assert_same(name: str, case: str, expected: _State, actual: _State) -> None:
    for key in sorted(expected.keys() | actual.keys()):
        want, got = expected.get(key, (None, 0)), actual.get(key, (None, 0))
        if want == got:
            continue
        want_doc, got_doc = want[0] or {}, got[0] or {}
        fields = sorted(
            field
            for field in want_doc.keys() | got_doc.keys()
            if want_doc.get(field) != got_doc.get(field)
        )
        raise AssertionError(
            f"{name} is not idempotent: {case} changed aggregate {key}"
            f" (version {want[1]} -> {got[1]}): "
            + ", ".join(f"{f}: {want_doc.get(f)!r} -> {got_doc.get(f)!r}" for f in fields)
        )
