"""Version gaps in one partition's stream (engine.gaps), as properties of any stream."""

from __future__ import annotations

from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from engine.errors import PoisonError, VersionGapError
from engine.gaps import VersionGaps

TP = TopicPartition("events", 0)
OTHER = TopicPartition("events", 1)


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[int], list[tuple[int, int]]]:
    """A stream of one aggregate's versions, and the (index, expected) of every jump in it.

    Each step is either the next version after a jump of 0..3 versions, or a
    redelivery of a version already seen.
    """
    versions: list[int] = []
    jumps: list[tuple[int, int]] = []
    last = 0
    for _ in range(draw(st.integers(1, 40))):
        if versions and draw(st.booleans()):
            versions.append(draw(st.sampled_from(versions)))
            continue
        skip = draw(st.sampled_from([0, 0, 0, 1, 3])) if last else 0
        if skip:
            jumps.append((len(versions), last + 1))
        last += 1 + skip
        versions.append(last)
    return versions, jumps


@given(streams())
def test_exactly_the_jumps_are_reported_with_the_version_that_was_expected(
    stream: tuple[list[int], list[tuple[int, int]]],
) -> None:
    versions, jumps = stream
    gaps = VersionGaps()
    reported = [
        (i, expected)
        for i, version in enumerate(versions)
        if (expected := gaps.check(TP, "order-1", version)) is not None
    ]
    assert reported == jumps


@given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=60))
def test_interleaved_aggregates_in_order_never_make_a_gap(order: list[str]) -> None:
    gaps = VersionGaps()
    versions = dict.fromkeys("abc", 0)
    for aggregate in order:
        versions[aggregate] += 1
        assert gaps.check(TP, aggregate, versions[aggregate]) is None


def test_the_same_id_on_two_partitions_is_two_streams() -> None:
    gaps = VersionGaps()
    assert gaps.check(TP, "a", 1) is None
    assert gaps.check(TP, "a", 2) is None
    assert gaps.check(OTHER, "a", 1) is None
    assert gaps.check(OTHER, "a", 3) == 2


def test_the_first_event_of_an_aggregate_not_remembered_is_not_checked() -> None:
    gaps = VersionGaps(capacity=2)
    assert gaps.check(TP, "a", 7) is None
    gaps.check(TP, "b", 1)
    gaps.check(TP, "c", 1)  # "a" is the least recently seen: forgotten
    assert gaps.check(TP, "a", 9) is None
    assert gaps.check(TP, "c", 3) == 2


def test_a_moved_partition_is_forgotten() -> None:
    gaps = VersionGaps()
    gaps.check(TP, "a", 1)
    gaps.check(OTHER, "b", 1)
    gaps.forget([TP])
    assert gaps.check(TP, "a", 5) is None
    assert gaps.check(OTHER, "b", 5) == 2


def test_the_error_names_the_missing_versions_and_is_poison() -> None:
    one = VersionGapError("order-1", 5, 4)
    assert isinstance(one, PoisonError)
    assert "version 4 missing" in str(one) and "right after version 3" in str(one)
    assert "versions 2 to 4 missing" in str(VersionGapError("order-1", 5, 2))
