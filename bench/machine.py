"""What the figures were measured on: CPUs, memory, load, Python, library and server versions."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions

from engine import Settings
from engine.stack.versions import ELASTICSEARCH_VERSION, KAFKA_VERSION

PACKAGES = (
    "cqrs-projection-engine",
    "aiokafka",
    "asyncpg",
    "redis",
    "elasticsearch",
    "pydantic",
    "fastapi",
    "uvicorn",
    "matplotlib",
    "psutil",
    "pyinstrument",
)


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def _package(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        return None
    return None


def _commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # read-only
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except OSError:
        return None
    return done.stdout.strip() or None


async def _servers(settings: Settings) -> dict[str, str | None]:
    servers: dict[str, str | None] = {
        "kafka": f"{KAFKA_VERSION} (pinned for the local stack)",
        "elasticsearch": f"{ELASTICSEARCH_VERSION} (pinned for the local stack)",
    }
    try:
        conn = await asyncpg.connect(settings.postgres.dsn(), timeout=5)
        try:
            servers["postgres"] = await conn.fetchval("SHOW server_version")
        finally:
            await conn.close()
    except (OSError, asyncpg.PostgresError):
        servers["postgres"] = None
    client = aioredis.Redis(host=settings.redis.host, port=settings.redis.port)
    try:
        info = await client.info("server")
        servers["redis"] = str(info.get("redis_version"))
    except (OSError, redis.exceptions.RedisError):
        servers["redis"] = None
    finally:
        await client.aclose()
    return servers


async def machine_info(settings: Settings) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_start": load_average(),
        "commit": _commit(),
        "packages": {name: _package(name) for name in PACKAGES},
        "servers": await _servers(settings),
    }
