"""A daemon that starts while Postgres or Kafka is down waits for them; a stop ends the wait.

The real ``engine run`` and ``engine relay`` are started as subprocesses with
Postgres (or Kafka) behind a proxy the test cuts before they start: every
connection is refused, exactly what a stopped server looks like, while the
service itself stays up for the test's own checks. Each test waits on what
the process logs (polling), never on a fixed sleep:

- started during the outage, the daemon logs that it is waiting, one line per
  attempt, and stays alive; once the proxy is restored it applies everything
  and ``--until-caught-up`` ends with exit 0;
- SIGTERM while it waits ends it at once with exit 0 ("stopped before it
  started"), not by the signal;
- past ``startup_timeout_s`` it exits 4 naming the service and its address;
- a refused login is not waited for: exit 3 at once, saying what to set;
- the relay does the same, for Kafka as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from engine import CommandBus, OutboxRelay, Resources, Settings
from tests.helpers import settings_env
from tests.integration.read.expected import assert_projections_match
from tests.integration.read.faults import assert_committed_to_the_end, wait_for
from tests.integration.read.proxy import CuttableProxy, proxy_to
from tests.integration.read.scenario import populate


@dataclass
class _Engine:
    """A running ``engine`` subprocess whose output (stdout and stderr) goes to ``log``."""

    process: asyncio.subprocess.Process
    log: Path

    def output(self) -> str:
        # Rich wraps long lines: compare with the whitespace folded.
        return " ".join(self.log.read_text(errors="replace").split())

    def attempts_logged(self, service: str) -> int:
        return self.output().count(f"waiting for {service} at")

    async def exit_code(self, timeout_s: float) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            raise AssertionError(
                f"still running after {timeout_s}s:\n{self.output()[-3000:]}"
            ) from None


@contextlib.asynccontextmanager
async def _engine(tmp_path: Path, *args: str, env: dict[str, str]) -> AsyncIterator[_Engine]:
    log = tmp_path / f"{args[0]}.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "engine",
            *args,
            env={**os.environ, "COLUMNS": "250", **env},
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        yield _Engine(process, log)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@contextlib.asynccontextmanager
async def _cut_proxy(host: str, port: int) -> AsyncIterator[CuttableProxy]:
    """A proxy to ``host:port`` that starts cut: its port refuses connections until restored."""
    async with proxy_to(host, port) as proxy:
        await proxy.cut()
        yield proxy


def _through_postgres(settings: Settings, proxy: CuttableProxy) -> dict[str, str]:
    return {
        **settings_env(settings),
        "ENGINE_POSTGRES__HOST": "127.0.0.1",
        "ENGINE_POSTGRES__PORT": str(proxy.port),
        # Retries every ~0.5 s, so the test sees several attempts in a few seconds.
        "ENGINE_RUNNER__BACKOFF_MAX_S": "0.5",
        "ENGINE_RELAY__BACKOFF_MAX_S": "0.5",
    }


async def _unpublished(pool: asyncpg.Pool) -> int:
    count = await pool.fetchval("SELECT count(*) FROM engine_outbox WHERE published_at IS NULL")
    return int(count)


async def test_a_daemon_started_while_postgres_is_down_waits_then_catches_up(
    settings_for_test: Settings, resources: Resources, bus: CommandBus, tmp_path: Path
) -> None:
    await populate(bus, orders=4)
    assert await OutboxRelay(
        settings_for_test.postgres, settings_for_test.kafka, settings_for_test.relay
    ).drain()
    pg = settings_for_test.postgres
    async with _cut_proxy(pg.host, pg.port) as proxy:
        env = _through_postgres(settings_for_test, proxy)
        async with _engine(tmp_path, "run", "--until-caught-up", env=env) as daemon:
            await wait_for(
                lambda: daemon.attempts_logged("PostgreSQL") >= 3,
                "three logged attempts to reach PostgreSQL",
                timeout_s=30,
            )
            assert daemon.process.returncode is None, daemon.output()[-3000:]
            assert f"127.0.0.1:{proxy.port}" in daemon.output()

            await proxy.restore()
            assert await daemon.exit_code(timeout_s=120) == 0, daemon.output()[-3000:]

    await assert_committed_to_the_end(settings_for_test)
    await assert_projections_match(
        settings_for_test, resources.pool, resources.redis, resources.elasticsearch
    )


async def test_sigterm_while_the_daemon_waits_for_postgres_stops_it_cleanly(
    settings_for_test: Settings, tmp_path: Path
) -> None:
    pg = settings_for_test.postgres
    async with _cut_proxy(pg.host, pg.port) as proxy:
        env = _through_postgres(settings_for_test, proxy)
        async with _engine(tmp_path, "run", env=env) as daemon:
            await wait_for(
                lambda: daemon.attempts_logged("PostgreSQL") >= 1,
                "a logged attempt to reach PostgreSQL",
                timeout_s=30,
            )
            daemon.process.send_signal(signal.SIGTERM)
            assert await daemon.exit_code(timeout_s=10) == 0, daemon.output()[-3000:]
            assert "stopped before it started" in daemon.output()


async def test_the_daemon_gives_up_after_the_start_up_bound_naming_the_service(
    settings_for_test: Settings, tmp_path: Path
) -> None:
    pg = settings_for_test.postgres
    async with _cut_proxy(pg.host, pg.port) as proxy:
        env = {
            **_through_postgres(settings_for_test, proxy),
            "ENGINE_RUNNER__STARTUP_TIMEOUT_S": "2",
        }
        async with _engine(tmp_path, "run", env=env) as daemon:
            assert await daemon.exit_code(timeout_s=30) == 4, daemon.output()[-3000:]
            output = daemon.output()
    assert (
        f"PostgreSQL is not reachable at 127.0.0.1:{proxy.port} (ENGINE_POSTGRES__PORT)" in output
    )
    assert "gave up waiting for PostgreSQL after 2s (ENGINE_RUNNER__STARTUP_TIMEOUT_S" in output
    assert daemon.attempts_logged("PostgreSQL") >= 2


@pytest.mark.parametrize("command", ["run", "relay"])
async def test_a_refused_login_is_not_waited_for(
    settings_for_test: Settings, tmp_path: Path, command: str
) -> None:
    env = {**settings_env(settings_for_test), "ENGINE_POSTGRES__PASSWORD": "not-the-password"}
    async with _engine(tmp_path, command, env=env) as process:
        assert await process.exit_code(timeout_s=30) == 3, process.output()[-3000:]
        output = process.output()
    assert "password authentication failed" in output
    assert "ENGINE_POSTGRES__PASSWORD" in output
    assert "waiting for" not in output


async def test_a_relay_started_while_postgres_is_down_waits_then_publishes(
    settings_for_test: Settings, pool: asyncpg.Pool, bus: CommandBus, tmp_path: Path
) -> None:
    await populate(bus, orders=2)
    assert await _unpublished(pool) > 0
    pg = settings_for_test.postgres
    async with _cut_proxy(pg.host, pg.port) as proxy:
        env = _through_postgres(settings_for_test, proxy)
        async with _engine(tmp_path, "relay", env=env) as relay:
            await wait_for(
                lambda: relay.attempts_logged("PostgreSQL") >= 3,
                "three logged attempts to reach PostgreSQL",
                timeout_s=30,
            )
            assert relay.process.returncode is None, relay.output()[-3000:]
            assert await _unpublished(pool) > 0

            await proxy.restore()
            published = False
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not published:
                assert relay.process.returncode is None, relay.output()[-3000:]
                assert loop.time() < deadline, "the relay did not publish within 60s"
                published = await _unpublished(pool) == 0
                await asyncio.sleep(0.1)

            relay.process.send_signal(signal.SIGTERM)
            assert await relay.exit_code(timeout_s=30) == 0, relay.output()[-3000:]


async def test_sigterm_while_the_relay_waits_for_kafka_stops_it_cleanly(
    settings_for_test: Settings, tmp_path: Path
) -> None:
    host, port = settings_for_test.kafka.first_host_port()
    async with _cut_proxy(host, port) as proxy:
        env = {
            **settings_env(settings_for_test),
            "ENGINE_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{proxy.port}",
            "ENGINE_RELAY__BACKOFF_MAX_S": "0.5",
        }
        async with _engine(tmp_path, "relay", env=env) as relay:
            await wait_for(
                lambda: relay.attempts_logged("Kafka") >= 1,
                "a logged attempt to reach Kafka",
                timeout_s=60,
            )
            relay.process.send_signal(signal.SIGTERM)
            assert await relay.exit_code(timeout_s=15) == 0, relay.output()[-3000:]
            assert "relay stopped before it started" in relay.output()


async def test_a_daemon_started_while_kafka_is_down_waits_then_catches_up(
    settings_for_test: Settings, resources: Resources, bus: CommandBus, tmp_path: Path
) -> None:
    await populate(bus, orders=2)
    assert await OutboxRelay(
        settings_for_test.postgres, settings_for_test.kafka, settings_for_test.relay
    ).drain()
    host, port = settings_for_test.kafka.first_host_port()
    async with _cut_proxy(host, port) as proxy:
        # Only the bootstrap goes through the proxy: the broker's metadata then names itself.
        env = {
            **settings_env(settings_for_test),
            "ENGINE_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{proxy.port}",
            "ENGINE_RUNNER__BACKOFF_MAX_S": "0.5",
        }
        async with _engine(tmp_path, "run", "--until-caught-up", env=env) as daemon:
            await wait_for(
                lambda: daemon.attempts_logged("Kafka") >= 2,
                "two logged attempts to reach Kafka",
                timeout_s=60,
            )
            assert daemon.process.returncode is None, daemon.output()[-3000:]

            await proxy.restore()
            assert await daemon.exit_code(timeout_s=120) == 0, daemon.output()[-3000:]

    await assert_committed_to_the_end(settings_for_test)
    await assert_projections_match(
        settings_for_test, resources.pool, resources.redis, resources.elasticsearch
    )
