"""The relay-stall rule: events wait and nothing was published for the limit."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.postgres.outbox import Backlog
from engine.relay_state import relay_stall

LIMIT_S = 30.0
LEADER = "relay@host:7"


def _backlog(
    count: int = 0,
    waited_s: float | None = None,
    last_published_s: float | None = None,
    leader: str | None = LEADER,
    lease_age_s: float | None = 1.0,
) -> Backlog:
    return Backlog(count, None, waited_s, last_published_s, leader, lease_age_s)


def test_events_waiting_and_nothing_published_past_the_limit_is_stalled_naming_the_leader() -> None:
    backlog = _backlog(count=40, waited_s=45.2, last_published_s=50.0, lease_age_s=48.0)
    assert relay_stall(backlog, LIMIT_S) == (
        "40 events wait in the outbox (the oldest 45s) and nothing was published for 50s"
        f" (over 30s); the leader relay {LEADER} last renewed its lease 48s ago"
    )


def test_no_publish_on_record_and_no_leader_ever_says_so() -> None:
    backlog = _backlog(count=3, waited_s=31.0, leader=None, lease_age_s=None)
    reason = relay_stall(backlog, LIMIT_S)
    assert reason is not None
    assert "no publish is on record" in reason
    assert "no relay has ever held the leader lease" in reason


@pytest.mark.parametrize(
    "backlog",
    [
        _backlog(),  # nothing waits
        # A busy relay draining a large, old backlog: it published a moment ago.
        _backlog(count=200_000, waited_s=600.0, last_published_s=0.1),
        # An idle relay's first event in an hour: fresh, published in milliseconds.
        _backlog(count=1, waited_s=0.01, last_published_s=3600.0),
        # Nothing published for long, but nothing waited long either.
        _backlog(count=5, waited_s=29.0, last_published_s=None),
    ],
)
def test_a_healthy_relay_busy_or_idle_is_not_stalled(backlog: Backlog) -> None:
    assert relay_stall(backlog, LIMIT_S) is None


AGE = st.none() | st.floats(min_value=0, max_value=1e7)


@given(count=st.integers(min_value=0, max_value=10**7), waited_s=AGE, last_published_s=AGE)
def test_stalled_exactly_when_something_waited_and_nothing_was_published_for_the_limit(
    count: int, waited_s: float | None, last_published_s: float | None
) -> None:
    backlog = _backlog(count=count, waited_s=waited_s, last_published_s=last_published_s)
    waited = count > 0 and waited_s is not None and waited_s > LIMIT_S
    silent = last_published_s is None or last_published_s > LIMIT_S
    assert (relay_stall(backlog, LIMIT_S) is not None) == (waited and silent)
