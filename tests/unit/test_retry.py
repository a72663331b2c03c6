"""engine.retry: the backoff's delays, and what retrying retries, re-raises and lets through."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.errors import PoisonError, TransientError
from engine.retry import Backoff, any_error, is_transient, retrying

# Delays short enough that a test waiting through several of them stays fast.
FAST = {"initial_s": 0.001, "max_s": 0.004}

seconds = st.floats(min_value=0.001, max_value=1000, allow_nan=False, allow_infinity=False)
jitters = st.floats(min_value=0, max_value=1, exclude_max=True)


def fixed(value: float) -> Callable[[], float]:
    return lambda: value


def test_delays_double_up_to_the_cap() -> None:
    backoff = Backoff(0.2, 1.0, jitter=fixed(1.0))  # the top of the jitter range: the full delay
    assert [backoff.next_delay() for _ in range(5)] == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0])


def test_jitter_takes_off_up_to_half() -> None:
    assert Backoff(0.2, 1.0, jitter=fixed(0.0)).next_delay() == pytest.approx(0.1)
    assert Backoff(0.2, 1.0, jitter=fixed(0.5)).next_delay() == pytest.approx(0.15)


def test_reset_starts_short_again() -> None:
    backoff = Backoff(0.2, 10.0, jitter=fixed(1.0))
    for _ in range(4):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == pytest.approx(0.2)


def test_an_initial_delay_above_the_cap_is_capped() -> None:
    assert Backoff(5.0, 1.0, jitter=fixed(1.0)).next_delay() == pytest.approx(1.0)


@given(initial=seconds, cap=seconds, jitter=jitters, waits=st.integers(1, 40))
def test_every_delay_is_jittered_capped_and_never_shrinks(
    initial: float, cap: float, jitter: float, waits: int
) -> None:
    backoff = Backoff(initial, cap, jitter=fixed(jitter))
    delays = [backoff.next_delay() for _ in range(waits)]
    for n, delay in enumerate(delays):
        assert delay == pytest.approx(min(cap, initial * 2**n) * (0.5 + jitter / 2))
        assert delay <= cap * (1 + 1e-9)
    assert delays == sorted(delays)
    backoff.reset()
    assert backoff.next_delay() == pytest.approx(delays[0])


async def test_retrying_retries_transient_errors_until_success() -> None:
    calls = 0
    noted: list[Exception] = []

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise TransientError(f"down {calls}")
        return "done"

    async def note(exc: Exception) -> None:
        noted.append(exc)

    assert await retrying(flaky, Backoff(**FAST), on_failure=note) == "done"
    assert calls == 4
    assert [str(exc) for exc in noted] == ["down 1", "down 2", "down 3"]


async def test_retrying_waits_the_backoff_between_attempts() -> None:
    jitter_calls = 0

    def jitter() -> float:
        nonlocal jitter_calls
        jitter_calls += 1
        return 0.0

    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise TransientError("down")

    await retrying(flaky, Backoff(**FAST, jitter=jitter))
    assert jitter_calls == 2  # one wait per failure, none after the success


@pytest.mark.parametrize("error", [PoisonError("bad event"), ValueError("a bug")])
async def test_retrying_reraises_what_it_does_not_retry(error: Exception) -> None:
    calls = 0
    noted: list[Exception] = []

    async def failing() -> None:
        nonlocal calls
        calls += 1
        raise error

    async def note(exc: Exception) -> None:
        noted.append(exc)

    with pytest.raises(type(error)) as raised:
        await retrying(failing, Backoff(**FAST), on_failure=note)
    assert raised.value is error
    assert calls == 1
    assert noted == []  # on_failure is for failures that will be retried


async def test_any_error_retries_every_exception() -> None:
    errors = [ValueError("a bug"), OSError("connection reset")]

    async def failing_twice() -> int:
        if errors:
            raise errors.pop(0)
        return 7

    assert await retrying(failing_twice, Backoff(**FAST), retry_if=any_error) == 7


async def test_retry_if_is_asked_once_per_failure_and_can_give_up() -> None:
    # The lane's rule: outages for ever, other failures a fixed number of times.
    attempts = 0
    failures: list[Exception] = [
        TransientError("down"),
        ValueError("bug 1"),
        TransientError("down"),
        ValueError("bug 2"),
        ValueError("bug 3"),
    ]

    async def failing() -> None:
        raise failures.pop(0)

    def worth_retrying(exc: Exception) -> bool:
        nonlocal attempts
        if is_transient(exc):
            return True
        attempts += 1
        return attempts < 3

    with pytest.raises(ValueError, match="bug 3"):
        await retrying(failing, Backoff(**FAST), retry_if=worth_retrying)
    assert attempts == 3
    assert failures == []


async def test_cancelling_during_a_wait_propagates() -> None:
    failed = asyncio.Event()

    async def down() -> None:
        raise TransientError("down")

    async def note(_: Exception) -> None:
        failed.set()

    # A long wait: the test cancels in the middle of it.
    task = asyncio.create_task(
        retrying(down, Backoff(60.0, 60.0), retry_if=any_error, on_failure=note)
    )
    await asyncio.wait_for(failed.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)
    assert task.cancelled()


async def test_a_cancellation_from_the_attempt_is_not_retried() -> None:
    calls = 0

    async def cancelled() -> None:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await retrying(cancelled, Backoff(**FAST), retry_if=any_error)
    assert calls == 1
