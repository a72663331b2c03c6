"""The front doors: `engine api` and `engine up --demo` as real processes, `--help` everywhere."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import sys
from pathlib import Path

import asyncpg
import httpx
import pytest
from typer.testing import CliRunner

from engine import Resources, Settings
from engine.cli.app import with_commands
from tests.helpers import child_pids, free_port, run_engine, settings_env

COMMANDS = ("api", "up", "run", "relay", "status", "rebuild", "dlq", "migrate", "demo", "stack")


def _cmdline(pid: int) -> list[str]:
    """``[python, -m, engine, part, ...]`` of an engine process."""
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")


async def _spawn(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine",
        *args,
        env={**os.environ, "COLUMNS": "250", **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # a signal to the test runner does not reach it
    )


async def _wait_healthy(base: str, timeout_s: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with httpx.AsyncClient() as client:
        while loop.time() < deadline:
            try:
                if (await client.get(f"{base}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.3)
    raise AssertionError(f"{base} never became healthy")


async def _stop(process: asyncio.subprocess.Process, timeout_s: float = 60) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), timeout_s)
    except TimeoutError:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return int(process.returncode or 0)


async def test_every_command_has_help() -> None:
    # The console script as a real process: its entry point registers every command.
    code, out, _ = await run_engine("--help")
    assert code == 0
    for command in COMMANDS:
        assert re.search(rf"\b{command}\b", out), command
    # Each command's own help in this process: the same app and the same rendering, without
    # paying an interpreter and the engine's imports (about 2 s of CPU) per command.
    app, runner = with_commands(), CliRunner()
    for command in COMMANDS:
        result = runner.invoke(app, [command, "--help"], prog_name="engine")
        assert result.exit_code == 0, (command, result.output)
        assert "Usage: engine " + command in result.output, command


async def test_engine_api_serves_commands_queries_and_docs(
    settings_for_test: Settings, pool: asyncpg.Pool, resources: Resources
) -> None:
    port = free_port()
    env = {**settings_env(settings_for_test), "ENGINE_API__PORT": str(port)}
    process = await _spawn("api", env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        await _wait_healthy(base)
        async with httpx.AsyncClient(base_url=base) as client:
            created = await client.post(
                "/customers", json={"name": "Ada Lovelace", "email": "ada@example.com"}
            )
            assert created.status_code == 201, created.text
            assert created.json()["consistency_token"]
            spec = (await client.get("/openapi.json")).json()
            for path in ("/orders", "/orders/{order_id}/ship", "/search/orders", "/status"):
                assert path in spec["paths"], path
            assert (await client.get("/docs")).status_code == 200
    finally:
        code = await _stop(process)
    assert code == 0


async def test_engine_api_refuses_a_read_role_that_cannot_log_in(
    settings_for_test: Settings, pool: asyncpg.Pool
) -> None:
    env = {**settings_env(settings_for_test), "ENGINE_READ__PASSWORD": "wrong"}
    code, _, err = await run_engine("api", "--port", str(free_port()), env=env)
    assert code == 3
    assert "engine_reader" in err and "engine migrate" in err


async def test_engine_up_with_demo_data_prints_queries_that_work(
    settings_for_test: Settings, pool: asyncpg.Pool, resources: Resources
) -> None:
    port = free_port()
    env = {**settings_env(settings_for_test), "ENGINE_API__PORT": str(port)}
    process = await _spawn(
        "up", "--demo", "--customers", "10", "--orders", "25", "--api-workers", "2", env=env
    )
    assert process.stdout is not None
    printed: list[str] = []
    try:
        while not printed or "Ctrl-C stops everything" not in printed[-1]:
            line = await asyncio.wait_for(process.stdout.readline(), 100)
            if not line:
                break
            printed.append(line.decode())
        text = "".join(printed)
        assert "the demo data is projected" in text, text
        commands = [shlex.split(line)[2] for line in printed if line.strip().startswith("curl")]
        assert len(commands) == 3
        async with httpx.AsyncClient() as client:
            detail, quick, search = [(await client.get(url)) for url in commands]
        assert detail.status_code == 200 and detail.json()["order_id"]
        assert quick.status_code == 200 and quick.json()["source"] == "redis"
        assert search.status_code == 200 and search.json()["total"] > 0
        # --api-workers reached the API: it supervises two server processes.
        (api,) = [c for c in child_pids(process.pid) if _cmdline(c)[3:4] == ["api"]]
        assert len(child_pids(api)) == 2, [_cmdline(c) for c in child_pids(api)]
    finally:
        code = await _stop(process)
    assert code == 0, (await process.stderr.read()).decode()[-2000:] if process.stderr else ""


@pytest.mark.parametrize("command", ["status", "demo"])
async def test_an_unreachable_service_exits_4(command: str, settings_for_test: Settings) -> None:
    env = {**settings_env(settings_for_test), "ENGINE_POSTGRES__PORT": "1"}
    code, _, err = await run_engine(command, env=env)
    assert code == 4, err
    assert "PostgreSQL" in err or "Postgres" in err
