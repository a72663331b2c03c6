"""Batch.joined: batches a lane applies together say the same progress as one big poll."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from engine.deliveries import Batch, Delivery, progress_of

BASE = datetime(2026, 1, 1, tzinfo=UTC)

# (partition, position, minutes after BASE), or a poison message (no item) on a partition.
messages = st.lists(
    st.one_of(
        st.tuples(st.integers(0, 3), st.integers(1, 10_000), st.integers(0, 600)),
        st.tuples(st.integers(0, 3), st.none(), st.none()),
    ),
    max_size=40,
)


def _batches(polls: list[list[Any]]) -> list[Batch]:
    offsets: dict[int, int] = {}
    batches = []
    for poll in polls:
        batch = Batch()
        for partition, position, minutes in poll:
            offset = offsets.get(partition, 0)
            offsets[partition] = offset + 1
            item = (
                None
                if position is None
                else SimpleNamespace(
                    envelope=SimpleNamespace(
                        position=position, occurred_at=BASE + timedelta(minutes=minutes)
                    )
                )
            )
            batch.append(
                Delivery(TopicPartition("t", partition), offset, None, b"", [], item)  # type: ignore[arg-type]
            )
        batches.append(batch)
    return batches


@given(st.lists(messages, min_size=1, max_size=5))
def test_joined_batches_report_the_progress_of_their_concatenation(polls: list[Any]) -> None:
    batches = _batches(polls)

    joined = Batch.joined(batches)

    assert list(joined) == [d for b in batches for d in b]
    key = lambda p: (p.topic, p.partition)  # noqa: E731
    assert sorted(joined.progress, key=key) == sorted(progress_of(joined), key=key)
