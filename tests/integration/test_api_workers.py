"""`engine api --workers 2`: two server processes on one port under a supervisor.

The real command runs as a subprocess. Its workers are the supervisor's
children (read from /proc); each serves from the socket the supervisor bound.
With one worker stopped (SIGSTOP) every new connection goes to the other, so
the test sees each serve on the shared port alone, a killed worker replaced
while the other keeps answering, and SIGTERM stopping them all with exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from pathlib import Path

import asyncpg
import httpx
import pytest

from engine import Resources, Settings
from tests.helpers import child_pids, free_port, run_engine, settings_env, supervised_engine
from tests.integration.read.faults import wait_for

pytestmark = pytest.mark.timeout(120)


def _exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


async def wait_until_healthy(client: httpx.AsyncClient, timeout_s: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        with contextlib.suppress(httpx.TransportError):
            if (await client.get("/health", timeout=2)).status_code == 200:
                return
        assert loop.time() < deadline, "the API never became healthy"
        await asyncio.sleep(0.1)


async def test_two_workers_share_the_port_survive_a_killed_one_and_stop_cleanly(
    settings_for_test: Settings, pool: asyncpg.Pool, resources: Resources, tmp_path: Path
) -> None:
    port = free_port()
    env = {**settings_env(settings_for_test), "ENGINE_API__PORT": str(port)}
    base = f"http://127.0.0.1:{port}"
    async with supervised_engine("api", 2, env, tmp_path / "api.log") as supervisor:
        await wait_for(lambda: len(child_pids(supervisor.pid)) == 2, "two workers", 60)
        first, second = sorted(child_pids(supervisor.pid))
        # Each worker alone (the other stopped) answers new connections: they share the port.
        for serving, stopped in ((second, first), (first, second)):
            os.kill(stopped, signal.SIGSTOP)
            try:
                async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                    await wait_until_healthy(client)
                    created = await client.post(
                        "/customers",
                        json={"name": f"Customer {serving}", "email": f"c{serving}@example.com"},
                    )
                    assert created.status_code == 201, created.text
            finally:
                os.kill(stopped, signal.SIGCONT)

        os.kill(first, signal.SIGKILL)
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            # The other worker answers at once; the supervisor starts a replacement.
            assert (await client.get("/health")).status_code == 200
            await wait_for(
                lambda: len(child_pids(supervisor.pid) - {second}) == 1, "a new worker", 30
            )
            assert second in child_pids(supervisor.pid)
            replacement = (child_pids(supervisor.pid) - {second}).pop()
            os.kill(second, signal.SIGSTOP)
            try:
                await wait_until_healthy(client)  # the replacement serves
            finally:
                os.kill(second, signal.SIGCONT)
        assert replacement != first

        workers = child_pids(supervisor.pid)
        supervisor.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(supervisor.wait(), 40) == 0
        assert not any(_exists(pid) for pid in workers)
    output = (tmp_path / "api.log").read_text(errors="replace")
    assert "all 2 workers stopped cleanly" in output, output[-3000:]


async def test_a_taken_port_exits_4_naming_the_address(
    settings_for_test: Settings, pool: asyncpg.Pool
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**settings_env(settings_for_test), "ENGINE_API__PORT": str(port)}
        code, _, err = await run_engine("api", "--workers", "2", env=env)
    assert code == 4
    assert f"cannot listen on 127.0.0.1:{port}" in " ".join(err.split())
