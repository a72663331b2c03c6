"""engine.stores.cache: the plan a store folds from, and the bound (pure logic, no stores)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from engine.stores.cache import Cached, DocumentCache, Plan


class _Item:
    """What the cache looks at in a projected event: its aggregate and version."""

    def __init__(self, aggregate_id: str, version: int) -> None:
        self.aggregate_id = aggregate_id
        self.version = version


ids = st.sampled_from([f"o{n}" for n in range(12)])
operations = st.lists(
    st.tuples(st.sampled_from(["put", "discard", "plan"]), ids, st.integers(1, 5)), max_size=80
)


@given(operations, st.integers(0, 6))
def test_the_cache_never_holds_more_than_its_bound(ops: list[Any], bound: int) -> None:
    cache = DocumentCache(bound)
    for op, aggregate_id, version in ops:
        if op == "put":
            cache.put(aggregate_id, Cached({"v": version}, version))
        elif op == "discard":
            cache.discard([aggregate_id])
        else:
            cache.plan([aggregate_id], [_Item(aggregate_id, version)], Plan())  # type: ignore[list-item]
        assert len(cache) <= bound


@given(st.lists(st.tuples(ids, st.integers(1, 4)), min_size=1, max_size=30), st.sets(ids))
def test_a_plan_reads_exactly_what_it_cannot_know(
    events: list[tuple[str, int]], conflicted: set[str]
) -> None:
    cache = DocumentCache(100)
    for aggregate_id in ("o1", "o2", "o3"):
        cache.put(aggregate_id, Cached({"status": "x"}, 2))
    items = [_Item(a, v) for a, v in events]
    wanted = sorted({a for a, _ in events})
    plan = Plan(must_read=set(conflicted))

    cache.plan(wanted, items, plan)  # type: ignore[arg-type]

    first: dict[str, int] = {}
    for a, v in events:
        first.setdefault(a, v)
    # Every aggregate is either known or read, never both, never neither.
    assert sorted([*plan.known, *plan.to_read]) == wanted
    for aggregate_id in wanted:
        if aggregate_id in conflicted:
            assert aggregate_id in plan.to_read  # a conflict is always read again
        elif aggregate_id in {"o1", "o2", "o3"}:
            assert plan.known[aggregate_id] == Cached({"status": "x"}, 2)
        elif first[aggregate_id] == 1:
            assert plan.known[aggregate_id] is None  # new: no read
        else:
            assert aggregate_id in plan.to_read


def test_the_least_recently_used_is_dropped_first() -> None:
    cache = DocumentCache(2)
    cache.put("a", Cached({}, 1))
    cache.put("b", Cached({}, 1))
    cache.plan(["a"], [_Item("a", 2)], Plan())  # type: ignore[list-item]  # a is used
    cache.put("c", Cached({}, 1))

    plan = cache.plan(["a", "b", "c"], [_Item(x, 2) for x in "abc"], Plan())  # type: ignore[misc]

    assert sorted(plan.known) == ["a", "c"]
    assert plan.to_read == ["b"]


def test_size_zero_turns_the_cache_off() -> None:
    cache = DocumentCache(0)
    cache.put("a", Cached({}, 1))

    assert len(cache) == 0
