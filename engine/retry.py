"""Retrying with capped, jittered exponential backoff: the one place it is written.

The lanes (set-up, apply, poison isolation, dead letters) and the outbox relay
all wait out outages the same way. It used to be written out at each of them,
and copies drift: one forgets the cap, another the jitter, a third catches
``BaseException`` and swallows a cancellation. Here it is written once.

- The delay starts at ``initial_s`` and doubles after every wait, never above
  ``max_s``; each wait is that delay times a random factor in [0.5, 1.0], so
  processes that failed together (a store restart) do not retry in lockstep.
- :func:`retrying` retries only what its ``retry_if`` accepts (by default a
  :class:`TransientError`: the store or broker is down or slow) and re-raises
  anything else at once. It only ever catches ``Exception``: a cancellation
  (``asyncio.CancelledError`` is a ``BaseException``) always propagates, also
  from the middle of a wait, so a lane or relay being stopped stops at once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from engine.errors import TransientError

T = TypeVar("T")


class Backoff:
    """The waits between attempts: capped, jittered, doubling; ``reset()`` after a success.

    ``jitter`` returns a number in [0, 1) (``random.random`` by default); tests
    pass a constant to get exact delays.
    """

    def __init__(
        self, initial_s: float, max_s: float, *, jitter: Callable[[], float] = random.random
    ) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._jitter = jitter
        self._delay = initial_s

    def next_delay(self) -> float:
        """The next wait in seconds; the one after it will be twice as long, up to the cap."""
        # The cap applies to the first delay too: initial_s may be set above max_s.
        wait = min(self.max_s, self._delay) * (0.5 + self._jitter() / 2)
        self._delay = min(self.max_s, self._delay * 2)
        return wait

    def reset(self) -> None:
        """Start again from ``initial_s`` (after a success, so the next outage starts short)."""
        self._delay = self.initial_s


def is_transient(exc: Exception) -> bool:
    """The default of :func:`retrying`: retry an outage, nothing else."""
    return isinstance(exc, TransientError)


def any_error(exc: Exception) -> bool:
    """Retry every ``Exception`` (never a cancellation)."""
    return True


async def retrying(
    attempt: Callable[[], Awaitable[T]],
    backoff: Backoff,
    *,
    retry_if: Callable[[Exception], bool] = is_transient,
    on_failure: Callable[[Exception], Awaitable[None]] | None = None,
) -> T:
    """Await ``attempt()`` until it returns, waiting ``backoff`` between failures.

    A failure ``retry_if`` accepts is passed to ``on_failure`` (to log it or
    show it to operators) and retried after the next delay; any other is
    re-raised as it is, without ``on_failure``. ``retry_if`` is asked once per
    failure, so it may count them (the lanes give up on a failing event after
    a number of attempts). There is no limit of its own: the caller is
    cancelled to stop it.
    """
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if not retry_if(exc):
                raise
            if on_failure is not None:
                await on_failure(exc)
        await asyncio.sleep(backoff.next_delay())
