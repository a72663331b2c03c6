"""The projection API: what a projection is, and the store seam it writes through.

A projection names the events it handles, a version, and is paired with a
store. Two shapes cover most read models:

- :class:`DocumentProjection`: one document per aggregate, computed by a pure
  fold ``apply(doc, event) -> doc``. The store loads the current documents of
  a batch's aggregates, folds the batch in memory and writes each document
  once, gated on the aggregate version, so any store that can do a conditional
  write (Postgres upsert ``WHERE version <``, a Redis Lua script, Elasticsearch
  external versioning) gives idempotent, ordered application in bulk.
- :class:`SqlProjection`: free-form SQL in the store's transaction, for read
  models that span aggregates (statistics). The Postgres store gates each
  event on a per-aggregate version row written in the same transaction.

Versions are the event's own per-aggregate version, never a Kafka offset:
offsets change when a topic is recreated or repartitioned, versions do not.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from engine.errors import TransientError
from engine.events import DomainEvent, EventEnvelope
from engine.stores.cache import DocumentCache, Plan

Document = dict[str, Any]


@dataclass(frozen=True)
class Projected:
    """One event as a projection sees it: the envelope and its decoded model."""

    envelope: EventEnvelope
    event: DomainEvent

    @property
    def aggregate_id(self) -> str:
        return self.envelope.aggregate_id

    @property
    def version(self) -> int:
        return self.envelope.aggregate_version


class Projection(ABC):
    """Base of every projection. Subclasses set ``name``, ``handles`` and ``version``."""

    name: ClassVar[str]
    handles: ClassVar[frozenset[str]]
    # Bump when the projection's output changes shape: a rebuild is then due.
    version: ClassVar[int] = 1

    def wants(self, envelope: EventEnvelope) -> bool:
        return envelope.event_type in self.handles


class DocumentProjection(Projection):
    """One document per aggregate, folded from its events in version order."""

    @abstractmethod
    def apply(self, doc: Document | None, item: Projected) -> Document:
        """The document after ``item`` (``doc`` is None before the first). Pure: no I/O.

        Documents travel through JSON-like stores: treat values of ``doc`` as
        what the store gives back (strings in Redis), and overwrite rather than
        compute from them where you can.
        """


class SqlProjection(Projection):
    """Free-form SQL, run in the Postgres store's transaction with its progress.

    ``tables`` names the tables the projection owns; ``schema`` creates them,
    with each name written as a ``{placeholder}``. The store substitutes the
    physical names of the generation it writes (``{name}_g{n}``) and readers
    use views under the plain names, so a rebuild can switch them.
    """

    tables: ClassVar[tuple[str, ...]] = ()
    schema: ClassVar[str] = ""

    @abstractmethod
    async def apply_batch(
        self, conn: Any, items: Sequence[Projected], tables: Mapping[str, str]
    ) -> None:
        """Apply ``items`` (de-duplicated, in order per aggregate) using ``conn``.

        ``tables`` maps each name in ``tables`` to the physical table to write.
        """


class ProjectionStore(Protocol):
    """The seam between the runner and one store. A new store implements these three.

    ``apply`` must be atomic with its own progress record: after it returns,
    every event in ``items`` is durably applied or was already applied; if it
    raises, re-applying the same items later must give the same result.
    """

    async def setup(self) -> None: ...

    async def apply(self, items: Sequence[Projected]) -> int:
        """Apply the items; return how many changed the store (the rest were duplicates)."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class RebuildableStore(ProjectionStore, Protocol):
    """A store whose contents live in numbered generations that readers can be switched to.

    ``at_generation`` gives the same store writing generation ``g``; ``publish``
    points readers at this generation (``conn`` is the rebuild's transaction,
    for stores that live in Postgres); ``drop`` deletes this generation.

    ``publish`` must be idempotent: it also repairs readers left behind by a
    rebuild that died after its switch. A store whose readers live in the
    same Postgres database may set the class attribute
    ``publish_in_transaction = True``: a rebuild then publishes inside its
    switch transaction, atomically with the generation record; any other
    store is published right after that commit (see :mod:`engine.rebuild`).
    """

    generation: int

    def at_generation(self, generation: int) -> RebuildableStore: ...

    async def publish(self, conn: Any) -> None: ...

    async def drop(self) -> None: ...


def fold(
    projection: DocumentProjection,
    current: dict[str, tuple[Document | None, int]],
    items: Sequence[Projected],
) -> dict[str, tuple[Document, int]]:
    """Fold ``items`` into ``current`` (aggregate id -> (doc, version)); return what changed.

    An item whose version is not above the document's version was applied
    before (a redelivery) and is skipped, so folding is idempotent.
    """
    changed: dict[str, tuple[Document, int]] = {}
    for item in items:
        known = changed.get(item.aggregate_id)
        if known is None:
            doc, version = current.get(item.aggregate_id, (None, 0))
            if doc is not None:
                # A copy: ``current`` stays what the store holds, which a store may
                # diff against or cache, even if a projection edits ``doc`` in place.
                doc = dict(doc)
        else:
            doc, version = known
        if item.version <= version:
            continue
        changed[item.aggregate_id] = (projection.apply(doc, item), item.version)
    return changed


Current = dict[str, tuple[Document | None, int]]
Changed = dict[str, tuple[Document, int]]


async def fold_and_write(
    projection: DocumentProjection,
    items: Sequence[Projected],
    read: Callable[[Sequence[str]], Awaitable[Current]],
    write: Callable[[Changed, Current], Awaitable[set[str]]],
    rounds: int = 5,
    *,
    cache: DocumentCache | None = None,
    plan: Plan | None = None,
) -> int:
    """Optimistic apply for compare-and-set stores: read, fold, write, retry the conflicts.

    ``read`` returns the current documents of some aggregates; ``write``
    writes the changed ones only where they are still as read, and returns the
    aggregate ids that changed meanwhile, which are read and folded again.
    With a ``cache`` (:mod:`engine.stores.cache`), only what it does not know
    is read, and a conflict drops the entry and reads that aggregate from then
    on; ``write`` puts what it wrote into the cache. ``plan`` (the cache's view
    of the current round, for stores that keep a stamp with each document) is
    filled in place. Returns how many documents were written.
    """
    pending = list(items)
    written = 0
    if cache is not None and plan is None:
        plan = Plan()
    for _ in range(rounds):
        ids = sorted({item.aggregate_id for item in pending})
        current: Current = {}
        if cache is not None and plan is not None:
            cache.plan(ids, pending, plan)
            for aggregate_id, known in plan.known.items():
                if known is not None:
                    current[aggregate_id] = (known.doc, known.version)
            ids = plan.to_read
        if ids:
            current.update(await read(ids))
        changed = fold(projection, current, pending)
        if not changed:
            return written
        conflicts = await write(changed, current)
        written += len(changed) - len(conflicts)
        if not conflicts:
            return written
        if cache is not None and plan is not None:
            cache.discard(conflicts)
            plan.must_read |= conflicts
        pending = [item for item in pending if item.aggregate_id in conflicts]
    raise TransientError(f"documents kept changing under {projection.name}; retrying")
