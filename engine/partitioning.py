"""Which Kafka partition an aggregate's events go to, computed the same way everywhere.

The relay sends every event to ``partition_for(aggregate_id, partitions)``
explicitly, and a consistency token names that same partition, so a reader
knows which partition's progress to wait for without asking Kafka. The hash is
Kafka's own (murmur2, as in the Java client's default partitioner), so tools
that key by aggregate id agree with us.
"""

from __future__ import annotations

from aiokafka.partitioner import murmur2


def partition_for(aggregate_id: str, partitions: int) -> int:
    """The partition of ``aggregate_id`` in a topic of ``partitions`` partitions."""
    if partitions < 1:
        raise ValueError("a topic has at least one partition")
    digest: int = murmur2(aggregate_id.encode())
    return (digest & 0x7FFFFFFF) % partitions
