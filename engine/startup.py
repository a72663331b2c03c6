"""Starting a daemon: waiting for its services, and stopping cleanly however early.

Start-up. A daemon (``engine run``, ``engine relay``) that starts while
Postgres or Kafka is down waits for them instead of exiting: a supervisor may
or may not restart a daemon that exits, and a running daemon already waits out
an outage, so one that is starting does the same. :class:`StartupWait` retries
the first connections with capped, jittered backoff (:mod:`engine.retry`),
logging one warning per attempt ("waiting for PostgreSQL at host:port: ..."),
for at most the daemon's ``startup_timeout_s`` in all (0: for ever). The bound
is there for a daemon pointed at the wrong address: after it, the last error is
raised as it is (``ServiceUnavailableError``, exit code 4, naming the service
and the setting that moves it). What waiting cannot fix is not waited for: a
refused login, a missing database or a schema not migrated raise a
:class:`ConfigurationError` at once (:func:`check_postgres`), saying what to set
or run.

A stop request must end that wait, however early it comes: :class:`StopSignals`
is created first thing in a daemon's command, before anything that can block,
and catches SIGTERM and SIGINT from then on. A stop during start-up raises
:class:`StartupStopped` out of the wait, and the daemon ends cleanly (exit 0)
instead of dying of the signal.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import TypeVar

import asyncpg

from engine.drivers import START_HINT, postgres_address, postgres_errors
from engine.errors import (
    ConfigurationError,
    SchemaMissingError,
    ServiceUnavailableError,
)
from engine.postgres.migrations import Migration
from engine.retry import Backoff, retrying
from engine.settings import PostgresSettings, env_var

log = logging.getLogger("engine.startup")

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """SIGTERM and SIGINT as a stop request, caught from the moment this is created.

    Create it before anything that can block; :meth:`event` then hands the
    signals over to the running event loop. A signal that came before that is
    not lost: the event starts set.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._note)

    def _note(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signum

    def event(self) -> asyncio.Event:
        """An event that SIGTERM/SIGINT set (already set if one came); call in the running loop."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop.set)
        # Checked after the loop took the signals over: one that came before is
        # seen here, one that comes after sets the event itself; none falls between.
        if self.received is not None:
            stop.set()
        return stop


class StartupStopped(Exception):
    """A stop request came while a daemon was still waiting for a service to start."""


class StartupWait:
    """Waits for a daemon's services at start-up: until they answer, a stop, or the bound.

    One bound for the whole start-up (every :meth:`until_available` call of
    this object): ``timeout_s`` from its creation, 0 for no bound. ``setting``
    names the variable that sets it, for the message when it passes.
    """

    def __init__(
        self, stop: asyncio.Event, *, timeout_s: float, setting: str, backoff: Backoff
    ) -> None:
        self._stop = stop
        self._timeout_s = timeout_s
        self._setting = setting
        self._backoff = backoff
        now = asyncio.get_running_loop().time()
        self._deadline = now + timeout_s if timeout_s > 0 else None

    async def until_available(
        self, attempt: Callable[[], Awaitable[T]], service: str, address: str
    ) -> T:
        """``attempt()``'s result, retried while it raises a :class:`TransientError`.

        Anything else is raised at once. Raises :class:`StartupStopped` when a
        stop is requested meanwhile, and the last failure (or, if the attempt
        was still waiting for an answer, a ``ServiceUnavailableError``) once
        the bound has passed.
        """
        failures = itertools.count(1)
        last: list[Exception] = []

        async def note(exc: Exception) -> None:
            last[:] = [exc]
            where, why = _describe(exc, service, address)
            log.warning(
                "waiting for %s: %s (attempt %d%s)", where, why, next(failures), self._left()
            )

        self._backoff.reset()
        waiting = asyncio.ensure_future(retrying(attempt, self._backoff, on_failure=note))
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait(
                {waiting, stopping}, timeout=self._remaining(), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for future in (waiting, stopping):
                future.cancel()
            await asyncio.gather(waiting, stopping, return_exceptions=True)
        if self._stop.is_set():
            raise StartupStopped(f"it was waiting for {service} at {address}")
        if not waiting.cancelled():
            return waiting.result()  # the service answered, or a failure waiting cannot fix
        log.error(
            "gave up waiting for %s after %gs (%s; 0 waits for ever)",
            service,
            self._timeout_s,
            self._setting,
        )
        if last:
            raise last[0]
        raise ServiceUnavailableError(
            service, address, f"no answer within {self._timeout_s:g}s ({self._setting})"
        )

    def _remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    def _left(self) -> str:
        remaining = self._remaining()
        return "" if remaining is None else f"; giving up in {remaining:.0f}s"


def _describe(exc: Exception, service: str, address: str) -> tuple[str, str]:
    """Where the failure was (service at address) and why (the driver's own words)."""
    if isinstance(exc, ServiceUnavailableError):
        service, address = exc.service, exc.address
    cause = exc.__cause__
    if cause is None:
        return f"{service} at {address}", str(exc)
    name, text = type(cause).__name__, str(cause)
    if text.startswith(name):  # aiokafka's errors name themselves already
        return f"{service} at {address}", text
    return f"{service} at {address}", f"{name}: {text}" if text else name


@contextmanager
def login_errors(postgres: PostgresSettings) -> Iterator[None]:
    """A refused login or a missing database: a ConfigurationError naming what to set.

    Not an outage (the server answered), so :mod:`engine.drivers` lets these
    pass untranslated; here the caller knows which settings named the role.
    """
    try:
        yield
    except (
        asyncpg.InvalidAuthorizationSpecificationError,  # includes a wrong password
        asyncpg.InvalidCatalogNameError,
    ) as exc:
        raise ConfigurationError(
            f"PostgreSQL at {postgres_address(postgres)} refused the connection ({exc}); check "
            f"{env_var('postgres', 'user')}, {env_var('postgres', 'password')} and "
            f"{env_var('postgres', 'database')}"
        ) from exc


async def check_postgres(postgres: PostgresSettings, migrations: Sequence[Migration]) -> None:
    """Connect once and check that ``migrations`` are applied.

    Raises a :class:`TransientError` while the server is down (worth waiting
    for) and a :class:`ConfigurationError` for a refused login, a missing
    database or a schema not migrated (not worth it).
    """
    address = postgres_address(postgres)
    with login_errors(postgres), postgres_errors(address, START_HINT):
        conn = await asyncpg.connect(postgres.dsn(), timeout=10)
        try:
            applied = {row["id"] for row in await conn.fetch("SELECT id FROM engine_migrations")}
        except asyncpg.UndefinedTableError as exc:
            raise SchemaMissingError(
                f"no migrations applied to the database {postgres.database!r} at {address}"
            ) from exc
        finally:
            # The check is done either way: a close that does not complete (a half-open
            # connection) must not turn it into an outage to wait out.
            try:
                await conn.close(timeout=5)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                conn.terminate()
    pending = [migration.id for migration in migrations if migration.id not in applied]
    if pending:
        raise SchemaMissingError(
            f"migrations not applied to the database {postgres.database!r} at {address}: "
            + ", ".join(pending)
        )
