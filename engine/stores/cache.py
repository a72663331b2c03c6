"""What a compare-and-set store already knows: the documents this process last wrote.

A document store folds each batch onto the current documents of its
aggregates, so every batch used to begin with a read of every one of them.
But the daemon wrote most of those documents itself, a batch or two ago: the
events of one order arrive over hours, hundreds of batches apart, on the one
partition this process owns. This cache remembers, per store and generation,
the last document it wrote or read for an aggregate, as the store would give
it back, with its version and the store's compare-and-set stamp.

Correctness never depends on it. Each write is still a compare-and-set
against the version (Redis) or the sequence number (Elasticsearch) the fold
started from, so a cached entry that is stale (another daemon wrote the
aggregate during a rebalance, ``engine dlq replay`` applied a parked one, a
write whose answer was lost went through after all) makes the write conflict;
the store then drops the entry, reads the document and folds again. The cost
of a stale entry is one extra round trip, never a wrong document.

Two more shortcuts follow from that:

- an aggregate whose first event in the batch is its version 1 had no
  document before it, as far as anyone honest knows: it is written as new
  (base version 0, ``create``) without a read; a document that does exist
  (a redelivery) answers with a conflict and is read then;
- an aggregate that conflicted is read from the store for the rest of the
  apply (``Plan.must_read``), so the shortcut cannot loop.

It is bounded (``max_documents``, least recently used dropped first) and
emptied whenever this process loses partitions (the runner calls
``forget_cached`` on every store that has one), so it only ever holds
documents of partitions this process owns. Its cost is about one kilobyte per
document of the orders projections (see ``ENGINE_RUNNER__DOCUMENT_CACHE_SIZE``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # engine.projection imports this module
    from engine.projection import Document, Projected

# The orders a busy shop has in flight, per store and process (ENGINE_RUNNER__DOCUMENT_CACHE_SIZE).
DEFAULT_MAX_DOCUMENTS = 10_000


@dataclass(frozen=True, slots=True)
class Cached:
    """A document as the store holds it (not as the fold made it), its version and CAS stamp."""

    doc: Document
    version: int
    stamp: Any = None


@dataclass
class Plan:
    """For one apply: what is known without a read, and what must be read."""

    known: dict[str, Cached | None] = field(default_factory=dict)  # None: known absent
    to_read: list[str] = field(default_factory=list)
    must_read: set[str] = field(default_factory=set)  # conflicted once: always read


class DocumentCache:
    """A bounded map aggregate id -> :class:`Cached`, least recently used dropped first."""

    def __init__(self, max_documents: int = DEFAULT_MAX_DOCUMENTS) -> None:
        self.max_documents = max_documents
        self._entries: OrderedDict[str, Cached] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def plan(self, ids: Sequence[str], items: Sequence[Projected], plan: Plan) -> Plan:
        """Fill ``plan`` for ``ids``: cached entries, new aggregates, and the rest to read."""
        plan.known.clear()
        plan.to_read = []
        first: dict[str, int] = {}
        for item in items:
            first.setdefault(item.aggregate_id, item.version)
        entries = self._entries
        for aggregate_id in ids:
            if aggregate_id in plan.must_read:
                plan.to_read.append(aggregate_id)
                continue
            hit = entries.get(aggregate_id)
            if hit is not None:
                entries.move_to_end(aggregate_id)
                plan.known[aggregate_id] = hit
                self.hits += 1
            elif first.get(aggregate_id) == 1:
                plan.known[aggregate_id] = None
                self.hits += 1
            else:
                plan.to_read.append(aggregate_id)
                self.misses += 1
        return plan

    def put(self, aggregate_id: str, entry: Cached) -> None:
        if not self.max_documents:
            return
        entries = self._entries
        entries[aggregate_id] = entry
        entries.move_to_end(aggregate_id)
        while len(entries) > self.max_documents:
            entries.popitem(last=False)

    def discard(self, ids: Iterable[str]) -> None:
        for aggregate_id in ids:
            self._entries.pop(aggregate_id, None)

    def clear(self) -> None:
        self._entries.clear()


@runtime_checkable
class CachingStore(Protocol):
    """A store with a :class:`DocumentCache`: the runner empties it when partitions move."""

    def forget_cached(self) -> None: ...
