"""Version gaps: an event whose aggregate version jumps past the next one.

The relay publishes every event of an aggregate, in version order, to the
aggregate's partition, so in the stream one aggregate's versions go 1, 2, 3,
... (a redelivery repeats earlier ones, which is harmless). A jump, version 5
right after version 3, means an event is missing from the topic: written by a
producer other than the relay, deleted, or lost. A document projection would
fold version 5 over the hole and show a state that never existed, and the
missing event, should it arrive later, would be skipped as already applied.

So the dispatcher treats the event after a jump like an event it cannot
decode whose aggregate is known: a ``*`` dead letter, whose reason names the
missing versions, parks the aggregate for every projection before any lane
gets the batch (see :mod:`engine.postgres.deadletters`). Its later events are
parked behind it; a missing event that turns up later is below the park and
is applied as usual; ``engine dlq replay`` then applies the parked sequence in
order (an operator who knows the missing event will never come accepts the
hole the same way).

What it can see. The dispatcher remembers, per partition, the last version it
saw of the ``capacity`` most recently seen aggregates
(``ENGINE_RUNNER__GAP_MEMORY_AGGREGATES``, about 250 bytes each; least recently
seen forgotten first), since this process started or was assigned the partition.
The first event of an aggregate it does not remember is not checked: a
store's version cannot stand in, since a projection does not see every event
type of an aggregate. Only the group's own stream is checked: a catch-up
re-reads what the dispatcher already checked, and finds the aggregate parked.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from aiokafka import TopicPartition


class VersionGaps:
    """The last version seen per aggregate and partition, bounded; reports jumps."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._capacity = capacity
        self._seen: OrderedDict[tuple[TopicPartition, str], int] = OrderedDict()

    def check(self, tp: TopicPartition, aggregate_id: str, version: int) -> int | None:
        """Note ``version`` of ``aggregate_id``; the version expected instead, if it jumped."""
        key = (tp, aggregate_id)
        last = self._seen.get(key)
        if last is None or version > last:
            self._seen[key] = version
        self._seen.move_to_end(key)
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        if last is not None and version > last + 1:
            return last + 1
        return None

    def note_if_next(self, tp: TopicPartition, aggregate_id: str, version: int) -> None:
        """Note ``version`` only if it is the next one (an event that is itself dead-lettered).

        A dead-lettered event in sequence is no reason to call the next one a
        gap; one that jumps (or carries a made-up version) must not hide the
        gaps after it either.
        """
        last = self._seen.get((tp, aggregate_id))
        if last is not None and version == last + 1:
            self.check(tp, aggregate_id, version)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop what was seen on ``partitions`` (they moved: another daemon may read them)."""
        gone = set(partitions)
        for key in [k for k in self._seen if k[0] in gone]:
            del self._seen[key]
