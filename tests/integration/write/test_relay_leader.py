"""Leader liveness: a standby relay takes over from a leader that is alive to Postgres but silent.

Two real ``engine relay`` processes against real Postgres and Kafka. The
leader is made silent in the two ways a session lock alone cannot notice: the
process is frozen (SIGSTOP), or its connection goes half-open (a proxy that
stops forwarding without closing either side, as a dropped network path does).
Either way its Postgres session, and so the advisory lock, stays; the standby
must still publish new events within the configured leader timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from engine import CommandBus, Settings
from engine.postgres import outbox
from tests.helpers import assert_in_order_without_gaps, consume, new_customer, settings_env

ROOT = Path(__file__).resolve().parents[3]
LEADER_TIMEOUT_S = 3.0
STANDBY_RETRY_S = 0.2
# The standby's bound is leader_timeout_s + standby_retry_s; the rest is slack for a
# loaded test machine. Generous, but finite: on code without the bound the wait fails.
TAKEOVER_WAIT_S = LEADER_TIMEOUT_S + STANDBY_RETRY_S + 12.0


def _env(settings: Settings, **overrides: str) -> dict[str, str]:
    return {
        **os.environ,
        **settings_env(settings),
        "ENGINE_RELAY__LEADER_TIMEOUT_S": str(LEADER_TIMEOUT_S),
        "ENGINE_RELAY__STANDBY_RETRY_S": str(STANDBY_RETRY_S),
        "ENGINE_RELAY__POLL_INTERVAL_S": "0.2",
        "ENGINE_RELAY__BACKOFF_MAX_S": "1.0",
        "COLUMNS": "250",  # the log (rich) wraps lines at this width
        **overrides,
    }


async def _start_relay(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("wb") as sink:  # the child keeps its own descriptor
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "engine",
            "relay",
            "--log-level",
            "info",
            env=env,
            cwd=ROOT,
            stdout=sink,
            stderr=sink,
        )


@contextlib.asynccontextmanager
async def _relays() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Relay processes started in the block; never left running (or frozen) after it."""
    started: list[asyncio.subprocess.Process] = []
    try:
        yield started
    finally:
        for process in started:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)
                    process.kill()
                await asyncio.wait_for(process.wait(), timeout=30)


async def _wait_until_published(
    pool: asyncpg.Pool, timeout_s: float, what: str, logs: list[Path]
) -> float:
    """Seconds until the outbox has nothing pending; fails after ``timeout_s``, with the logs."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        async with pool.acquire() as conn:
            if await outbox.pending_count(conn) == 0:
                return loop.time() - start
        assert loop.time() - start < timeout_s, (
            f"{what}: nothing published in {timeout_s:.0f}s\n"
            + "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
        )
        await asyncio.sleep(0.05)


async def _wait_for_standby(pool: asyncpg.Pool, logs: list[Path]) -> None:
    """Until a second relay session exists in this database and has asked for the lock.

    A relay's first statement on its connection is its attempt to take the
    lock, so a relay session that has run a statement and holds no advisory
    lock is a standby that asked. (Matching the text of its *last* statement
    would race with the lease check it runs right after each attempt.)
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        waiting = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND application_name LIKE 'engine-relay:%'"
            " AND query <> ''"
            " AND pid NOT IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)"
        )
        if waiting:
            return
        assert loop.time() < deadline, "the standby relay never asked for the lock:\n" + "\n".join(
            log.read_text()[-2000:] for log in logs
        )
        await asyncio.sleep(0.05)


async def _stop(processes: list[asyncio.subprocess.Process]) -> list[int]:
    for process in processes:
        process.send_signal(signal.SIGTERM)
    return [await asyncio.wait_for(p.wait(), timeout=30) for p in processes]


async def _check_topic(pool: asyncpg.Pool, settings: Settings) -> None:
    total = await pool.fetchval("SELECT count(*) FROM engine_event_log")
    events = await consume(settings.kafka, total)
    assert {e.position for e in events} == set(range(1, total + 1))  # nothing lost
    assert_in_order_without_gaps(events)  # duplicates allowed, reordering not


async def test_a_standby_takes_over_from_a_frozen_leader_within_the_leader_timeout(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, tmp_path: Path
) -> None:
    env = _env(settings_for_test)
    logs = [tmp_path / "leader.log", tmp_path / "standby.log"]
    async with _relays() as started:
        started.append(leader := await _start_relay(env, logs[0]))
        await new_customer(bus)
        await _wait_until_published(pool, 60, "the first relay", logs)  # so it is the leader
        started.append(standby := await _start_relay(env, logs[1]))
        await _wait_for_standby(pool, logs)

        leader.send_signal(signal.SIGSTOP)  # alive to Postgres, silent to everyone
        for _ in range(3):
            await new_customer(bus)
        took = await _wait_until_published(
            pool, TAKEOVER_WAIT_S, "after SIGSTOP of the leader", logs
        )
        assert took < TAKEOVER_WAIT_S

        leader.send_signal(signal.SIGCONT)  # it wakes up to a terminated session
        for _ in range(3):
            await new_customer(bus)
        await _wait_until_published(pool, 60, "after SIGCONT of the old leader", logs)
        codes = await _stop([leader, standby])
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    assert "terminating it" in logs[1].read_text()
    await _check_topic(pool, settings_for_test)


class _Blackhole:
    """A TCP proxy to Postgres that can stop forwarding without closing anything.

    After ``cut()``, bytes in either direction are dropped and no socket is
    closed, not even when the client gives up: the server's side of the
    session stays open and idle, as it does behind a dead network path.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._cut = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def __aenter__(self) -> _Blackhole:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut(self) -> None:
        self._cut.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        self._writers += [writer, upstream_writer]
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self._tasks.add(task)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while chunk := await source.read(65536):
            if not self._cut.is_set():
                sink.write(chunk)
                await sink.drain()
        await self._cut.wait()  # after the cut, an EOF is not passed on either
        await asyncio.Event().wait()


@pytest.mark.timeout(180)
async def test_a_standby_takes_over_from_a_leader_whose_connection_went_half_open(
    bus: CommandBus, pool: asyncpg.Pool, settings_for_test: Settings, tmp_path: Path
) -> None:
    logs = [tmp_path / "leader.log", tmp_path / "standby.log"]
    postgres = settings_for_test.postgres
    async with _Blackhole(postgres.host, postgres.port) as proxy, _relays() as started:
        leader_env = _env(settings_for_test, ENGINE_POSTGRES__PORT=str(proxy.port))
        started.append(leader := await _start_relay(leader_env, logs[0]))
        await new_customer(bus)
        await _wait_until_published(pool, 60, "the relay behind the proxy", logs)
        started.append(standby := await _start_relay(_env(settings_for_test), logs[1]))
        await _wait_for_standby(pool, logs)

        proxy.cut()
        for _ in range(3):
            await new_customer(bus)
        await _wait_until_published(
            pool, TAKEOVER_WAIT_S, "after the leader's link went dead", logs
        )
        codes = await _stop([leader, standby])
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    await _check_topic(pool, settings_for_test)
