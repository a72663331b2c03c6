"""What every benchmark shares: private names per run, engine processes, RSS sampling.

Each benchmark runs in an :class:`Isolated` environment: a fresh database
created on the local server (migrated, with the read-only role granted, like the
integration tests' ``test_db``), its own Kafka topic and consumer group, Redis
key prefix and Elasticsearch index prefix. Everything is removed afterwards,
also when the benchmark fails.

Engine processes (``engine run``, ``engine relay``, ``engine api``) are real
subprocesses of this interpreter, configured through ``ENGINE_*`` variables,
so the RSS measured is the daemon's own, not the harness's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient
from elasticsearch import AsyncElasticsearch

from engine import Settings, create_pool, ensure_topic, grant_read_access, migrate
from projections.orders import APP


def say(text: str) -> None:
    """Progress and figures for the person running the benchmark (stderr keeps stdout clean)."""
    print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Isolated:
    """Settings pointing at this run's private database, topic, group and prefixes."""

    settings: Settings
    label: str

    def env(self) -> dict[str, str]:
        """``ENGINE_*`` variables that make an ``engine`` subprocess use these names."""
        s = self.settings
        return {
            "ENGINE_POSTGRES__DATABASE": s.postgres.database,
            "ENGINE_KAFKA__TOPIC": s.kafka.topic,
            "ENGINE_KAFKA__PARTITIONS": str(s.kafka.partitions),
            "ENGINE_RUNNER__GROUP_ID": s.runner.group_id,
            "ENGINE_REDIS__KEY_PREFIX": s.redis.key_prefix,
            "ENGINE_ELASTICSEARCH__INDEX_PREFIX": s.elasticsearch.index_prefix,
            "ENGINE_API__PORT": str(s.api.port),
        }


def isolated_settings(base: Settings, label: str, tag: str) -> Settings:
    """``base`` with every name made private to this run (``tag``) and benchmark (``label``)."""
    return base.model_copy(
        update={
            "postgres": base.postgres.model_copy(
                update={"database": f"engine_bench_{label}_{tag}"}
            ),
            "kafka": base.kafka.model_copy(update={"topic": f"bench.{label}.{tag}"}),
            "runner": base.runner.model_copy(update={"group_id": f"bench-{label}-{tag}"}),
            "redis": base.redis.model_copy(update={"key_prefix": f"bench:{label}:{tag}:"}),
            "elasticsearch": base.elasticsearch.model_copy(
                update={"index_prefix": f"bench-{label}-{tag}"}
            ),
            "api": base.api.model_copy(update={"port": free_port()}),
        }
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def isolated(base: Settings, label: str) -> AsyncIterator[Isolated]:
    """A private environment for one benchmark, created now and removed on the way out."""
    settings = isolated_settings(base, label, uuid.uuid4().hex[:10])
    await _create_database(settings)
    try:
        await ensure_topic(settings.kafka)
        yield Isolated(settings, label)
    finally:
        await asyncio.shield(_clean_up(settings))


async def _create_database(settings: Settings) -> None:
    admin = settings.postgres.model_copy(update={"database": "postgres"})
    conn = await asyncpg.connect(admin.dsn())
    try:
        await conn.execute(f'CREATE DATABASE "{settings.postgres.database}"')
    finally:
        await conn.close()
    pool = await create_pool(settings.postgres)
    try:
        await migrate(pool, APP.all_migrations())
        await grant_read_access(pool, settings.postgres, settings.read.resolve(settings.postgres))
    finally:
        await pool.close()


async def _clean_up(settings: Settings) -> None:
    steps = (_drop_database, _drop_redis_keys, _drop_indices, _drop_topic)
    for step in steps:
        try:
            await step(settings)
        except Exception as exc:  # clean up as much as possible, say what is left
            say(f"  clean-up: {step.__name__} failed: {exc}")


async def _drop_database(settings: Settings) -> None:
    admin = settings.postgres.model_copy(update={"database": "postgres"})
    conn = await asyncpg.connect(admin.dsn())
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{settings.postgres.database}" WITH (FORCE)')
    finally:
        await conn.close()


async def _drop_redis_keys(settings: Settings) -> None:
    client = aioredis.Redis(
        host=settings.redis.host, port=settings.redis.port, db=settings.redis.db
    )
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{settings.redis.key_prefix}*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                await client.unlink(*batch)
                batch = []
        if batch:
            await client.unlink(*batch)
    finally:
        await client.aclose()


async def _drop_indices(settings: Settings) -> None:
    es = AsyncElasticsearch(settings.elasticsearch.url, request_timeout=60)
    try:
        pattern = f"{settings.elasticsearch.index_prefix}-*"
        found = await es.indices.get(index=pattern, allow_no_indices=True)
        if found:  # deleting by wildcard is refused (destructive_requires_name)
            await es.indices.delete(index=",".join(found))
    finally:
        await es.close()


async def _drop_topic(settings: Settings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.delete_topics([settings.kafka.topic])
    finally:
        await admin.close()


# -- engine subprocesses and their memory ----------------------------------------------


def rss_bytes(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS so far) of a live process, from /proc (Linux).

    /proc rather than psutil: ``VmHWM`` is the kernel's own high-water mark,
    so a peak between two samples is not missed.
    """
    return _proc_status_kb(pid, "VmRSS") * 1024, _proc_status_kb(pid, "VmHWM") * 1024


def children_of(pid: int) -> list[int]:
    """The child processes of ``pid`` (``engine run --workers N``'s workers), from /proc."""
    try:
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(child) for child in found]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used so far (0 when unknown)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # Fields 14 and 15 of /proc/PID/stat (utime, stime), counted after the ")".
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_status_kb(pid: int, field_name: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    return 0


@dataclass
class EngineProcess:
    """One ``engine`` command running as a child process, with its RSS sampled."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    peak_rss: int = 0
    cpu_s: float = 0.0
    samples: list[tuple[float, int]] = field(default_factory=list)
    # Under a supervisor (workers > 1): the largest peak of any one worker, and each
    # worker's CPU seconds by pid (a restarted worker is another pid).
    peak_worker_rss: int = 0
    worker_cpu_s: dict[int, float] = field(default_factory=dict)
    _sampler: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def sample(self) -> None:
        if self.process.returncode is not None:
            return
        rss, hwm = rss_bytes(self.pid)
        self.peak_rss = max(self.peak_rss, rss, hwm)
        self.cpu_s = max(self.cpu_s, cpu_seconds(self.pid))
        self.samples.append((time.monotonic(), rss))
        for child in children_of(self.pid):
            self.peak_worker_rss = max(self.peak_worker_rss, *rss_bytes(child))
            self.worker_cpu_s[child] = max(self.worker_cpu_s.get(child, 0.0), cpu_seconds(child))

    async def _sample_forever(self, every_s: float) -> None:
        while self.process.returncode is None:
            self.sample()
            await asyncio.sleep(every_s)

    def start_sampling(self, every_s: float = 0.25) -> None:
        self._sampler = asyncio.create_task(self._sample_forever(every_s))

    async def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (clean shutdown), then SIGKILL after ``timeout_s``; the exit code."""
        self.sample()  # VmHWM just before it goes: the true peak
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout=timeout_s)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        return int(self.process.returncode or 0)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


async def start_engine(
    env: Isolated,
    args: Sequence[str],
    logs: Path,
    name: str,
    *,
    prefix: Sequence[str] = (),
    extra_env: dict[str, str] | None = None,
    workers: int = 1,
) -> EngineProcess:
    """Start ``python -m engine ARGS`` (behind ``prefix``, e.g. a profiler) for ``env``.

    ``workers`` is ``engine run``'s process count (ENGINE_RUNNER__WORKERS), 1 by
    default whatever the machine's cores: a figure must say how many it used.
    With more than one, the process started is the supervisor: its RSS, its CPU
    and a ``prefix`` profiler are not the workers' (they are its children).
    """
    log_path = _log_file(logs, f"{env.label}-{name}.log")
    command = (
        [*prefix, "-m", "engine", *args] if prefix else [sys.executable, "-m", "engine", *args]
    )
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            *command,
            env={
                **os.environ,
                **env.env(),
                "ENGINE_RUNNER__WORKERS": str(workers),
                **(extra_env or {}),
                "COLUMNS": "200",
            },
            stdout=log,
            stderr=log,
            stdin=asyncio.subprocess.DEVNULL,
        )
    engine = EngineProcess(name, process, log_path)
    engine.start_sampling()
    return engine


def _log_file(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def mb(value: int | float) -> float:
    return round(value / (1024 * 1024), 1)


class Clock:
    """Monotonic seconds since it was made; ``wall`` maps a monotonic time to epoch seconds."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self._offset = time.time() - self.start

    def now(self) -> float:
        return time.monotonic() - self.start

    def wall(self, monotonic: float) -> float:
        return monotonic + self._offset


async def applied_by_projection(pool: asyncpg.Pool, topic: str) -> dict[str, int]:
    """Per projection, how many messages of ``topic`` it has finished (sum of next offsets).

    On a fresh topic (offsets from 0) that is the number of events applied.
    """
    rows = await pool.fetch(
        "SELECT projection, sum(next_offset)::bigint AS done FROM engine_partition_progress"
        " WHERE topic = $1 GROUP BY projection",
        topic,
    )
    return {row["projection"]: int(row["done"]) for row in rows}


class BenchError(Exception):
    """A benchmark could not measure what it set out to (the message says why)."""


async def poll_until(
    what: str,
    check: Callable[[], Awaitable[bool]],
    timeout_s: float,
    every_s: float = 0.05,
    watch: Sequence[EngineProcess] = (),
) -> None:
    """Wait until ``check()`` is true; a watched process that dies, or the timeout, fails it."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        for engine in watch:
            if engine.process.returncode is not None:
                raise BenchError(
                    f"{engine.name} exited ({engine.process.returncode}) while waiting for "
                    f"{what}:\n{engine.log_tail()}"
                )
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(every_s)
