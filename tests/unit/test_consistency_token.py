"""Consistency tokens and partitioning: pure logic, property-tested."""

from __future__ import annotations

import uuid

import pytest
from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given
from hypothesis import strategies as st

from engine import CommandResult, ConsistencyToken, ValidationFailedError, partition_for
from engine.api.errors import engine_error_response
from engine.deliveries import Delivery, progress_of
from engine.errors import WriteNotAppliedError
from engine.testing import given as given_events
from projections.orders import registry
from tests.unit.test_testing_kit import confirmed, created


@given(st.text(min_size=1, max_size=60), st.integers(min_value=1, max_value=64))
def test_partition_for_is_kafkas_default_partitioner(key: str, partitions: int) -> None:
    expected = DefaultPartitioner()(key.encode(), list(range(partitions)), [])
    assert partition_for(key, partitions) == expected


@given(st.integers(0, 999), st.integers(0, 2**62))
def test_a_token_round_trips(partition: int, position: int) -> None:
    token = ConsistencyToken(partition, position)
    assert ConsistencyToken.parse(token.encode()) == token


@pytest.mark.parametrize(
    "text", ["", "abc", "1", "1.", ".5", "-1.5", "1.-5", "1.5.6", "1e3.5", "99999.1", "1.5 OR 1"]
)
def test_a_malformed_token_is_a_validation_error_naming_the_field(text: str) -> None:
    with pytest.raises(ValidationFailedError) as caught:
        ConsistencyToken.parse(text)
    assert caught.value.field == "consistency_token"


def test_the_token_of_a_result_names_the_aggregates_partition() -> None:
    result = CommandResult(
        command_id=uuid.uuid4(), aggregate_id="order-1", version=2, position=41, event_types=["X"]
    )
    token = ConsistencyToken.of(result, 6)
    assert token == ConsistencyToken(partition_for("order-1", 6), 41)
    nothing = result.model_copy(update={"position": None})
    assert ConsistencyToken.of(nothing, 6) is None


def _delivery(partition: int, offset: int) -> Delivery:
    return Delivery(TopicPartition("t", partition), offset, None, None, (), None)


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10_000)), min_size=1, max_size=50))
def test_progress_of_a_batch_is_the_next_offset_per_partition(
    pairs: list[tuple[int, int]],
) -> None:
    progress = {p.partition: p for p in progress_of([_delivery(p, o) for p, o in pairs])}
    assert set(progress) == {p for p, _ in pairs}
    for partition, seen in progress.items():
        assert seen.next_offset == max(o for p, o in pairs if p == partition) + 1
        assert seen.position == 0  # poison-only deliveries carry no position
        assert seen.event_at is None


def test_progress_keeps_the_highest_position_and_time_per_partition() -> None:
    stream = given_events(created("o1"), confirmed("o1"), aggregate_id="o1", registry=registry)
    first, second = stream.items
    batch = [
        Delivery(TopicPartition("t", 0), 7, None, None, (), second),
        Delivery(TopicPartition("t", 0), 5, None, None, (), first),
        Delivery(TopicPartition("t", 1), 3, None, None, (), None),
    ]
    progress = {p.partition: p for p in progress_of(batch)}
    assert progress[0].next_offset == 8
    assert progress[0].position == second.envelope.position
    assert progress[0].event_at == second.envelope.occurred_at
    assert (progress[1].next_offset, progress[1].position) == (4, 0)


def test_a_dead_lettered_write_answers_503_without_retry_after() -> None:
    response = engine_error_response(WriteNotAppliedError("order_details", "1.42", 7))
    assert response.status_code == 503
    assert "retry-after" not in response.headers
    body = bytes(response.body).decode()
    assert '"error":"write_dead_lettered"' in body and '"dead_letter":7' in body
