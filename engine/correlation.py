"""The correlation id of the work in progress, so log lines and events can carry it.

A command's correlation id follows everything it causes: the HTTP request
that carried it (header ``X-Correlation-ID``), the command, the events it
recorded (their ``correlation_id``, also a Kafka header), and the daemon's log
lines about those events. One id is enough to follow an order from the
request to every store.

It lives in a context variable: asyncio copies the context into every task,
so the id bound for a request reaches the command bus and every log line
written while serving it, without being passed through each call. The
daemon binds it per event only around the log lines that name an event,
never on its hot path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from uuid import UUID

HEADER = "X-Correlation-ID"

_current: ContextVar[UUID | None] = ContextVar("engine_correlation_id", default=None)


def current() -> UUID | None:
    """The correlation id bound in this context (a request, a command), if any."""
    return _current.get()


@contextmanager
def bound(correlation_id: UUID | None) -> Iterator[None]:
    """Bind ``correlation_id`` for the block (None: unbind)."""
    token = _current.set(correlation_id)
    try:
        yield
    finally:
        _current.reset(token)


def parse(value: str | bytes | None) -> UUID | None:
    """A correlation id from a header, or None if absent or not a UUID (a new one is made)."""
    if not value:
        return None
    try:
        return UUID(value.decode("latin-1") if isinstance(value, bytes) else value)
    except ValueError:
        return None
