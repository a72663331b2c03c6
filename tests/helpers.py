"""Small builders and readers shared by the integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from engine import Command, CommandBus, CommandResult, EventEnvelope, KafkaSettings, Settings
from engine.codec import decode
from projections.orders import (
    Address,
    CancelOrder,
    ChangeShippingAddress,
    ConfirmOrder,
    CreateOrder,
    DeliverOrder,
    OrderItemRequest,
    RegisterCustomer,
    RegisterProduct,
    ShipOrder,
)

ADDRESS = Address(street="1 Analytical Way", city="London", postal_code="N1 9GU", country="UK")
MOVED = Address(street="2 Engine Row", city="Lyon", postal_code="69001", country="FR")


def order_life_cycle(
    rng: random.Random, customers: list[str], products: list[str]
) -> list[Command]:
    """The commands of one random order's life, in order: created, then as far as chance goes.

    Some orders move house after creation; some are cancelled at the end (which
    the rules refuse once delivered: callers stop the life cycle there).
    """
    order_id = uuid.uuid4()
    items = [
        OrderItemRequest(product_id=uuid.UUID(p), quantity=rng.randint(1, 4))
        for p in rng.sample(products, rng.randint(1, 3))
    ]
    steps: list[Command] = [
        CreateOrder(
            order_id=order_id,
            customer_id=uuid.UUID(rng.choice(customers)),
            items=items,
            shipping_address=ADDRESS,
        ),
        ConfirmOrder(order_id=order_id),
        ShipOrder(order_id=order_id, tracking_number=f"T{rng.randint(1, 9999)}"),
        DeliverOrder(order_id=order_id),
    ][: rng.randint(1, 4)]
    if rng.random() < 0.2:
        steps.insert(1, ChangeShippingAddress(order_id=order_id, shipping_address=MOVED))
    if rng.random() < 0.2:
        steps.append(CancelOrder(order_id=order_id, reason="changed my mind"))
    return steps


async def new_customer(bus: CommandBus, name: str = "Ada Lovelace") -> str:
    email = f"{uuid.uuid4().hex[:10]}@example.com"
    result = await bus.execute(RegisterCustomer(name=name, email=email))
    return result.aggregate_id


async def new_product(
    bus: CommandBus, name: str = "Difference Engine", price: str = "19.99"
) -> str:
    result = await bus.execute(RegisterProduct(name=name, price=Decimal(price)))
    return result.aggregate_id


async def new_order(
    bus: CommandBus, customer_id: str, items: list[tuple[str, int]]
) -> CommandResult:
    return await bus.execute(
        CreateOrder(
            customer_id=uuid.UUID(customer_id),
            items=[OrderItemRequest(product_id=uuid.UUID(p), quantity=q) for p, q in items],
            shipping_address=ADDRESS,
        )
    )


async def consume(
    kafka: KafkaSettings, expected: int, timeout_s: float = 60.0
) -> list[EventEnvelope]:
    """Read the topic from the start until ``expected`` messages arrived (or time runs out)."""
    consumer = AIOKafkaConsumer(
        kafka.topic,
        bootstrap_servers=kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    found: list[EventEnvelope] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while len(found) < expected and loop.time() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for messages in batches.values():
                found.extend(decode(m.value) for m in messages)
    finally:
        await consumer.stop()
    return found


def versions_by_aggregate(events: list[EventEnvelope]) -> dict[str, list[int]]:
    """Each aggregate's versions in the order they were consumed."""
    seen: dict[str, list[int]] = {}
    for event in events:
        seen.setdefault(event.aggregate_id, []).append(event.aggregate_version)
    return seen


def assert_in_order_without_gaps(events: list[EventEnvelope]) -> None:
    """Per aggregate, versions first appear as 1, 2, ..., N: none missing, none out of order.

    Repeats (at-least-once re-deliveries) are allowed after a version's first sight.
    """
    for aggregate_id, versions in versions_by_aggregate(events).items():
        firsts = list(dict.fromkeys(versions))
        assert firsts == list(range(1, len(firsts) + 1)), (aggregate_id, versions)


async def run_engine(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 120.0
) -> tuple[int, str, str]:
    """Run the real `engine` command; returns (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine",
        *args,
        env={**os.environ, "COLUMNS": "250", **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=timeout_s)
    except TimeoutError:
        process.kill()
        out, err = await process.communicate()
        raise AssertionError(
            f"engine {' '.join(args)} timed out:\n{err.decode()[-3000:]}"
        ) from None
    return int(process.returncode or 0), out.decode(), err.decode()


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment that makes an `engine` subprocess use this test's names."""
    return {
        "ENGINE_POSTGRES__DATABASE": settings.postgres.database,
        "ENGINE_KAFKA__TOPIC": settings.kafka.topic,
        "ENGINE_KAFKA__PARTITIONS": str(settings.kafka.partitions),
        "ENGINE_RUNNER__GROUP_ID": settings.runner.group_id,
        "ENGINE_RUNNER__MAX_LATENCY_MS": str(settings.runner.max_latency_ms),
        # One process whatever the machine's cores: tests signal the daemon's own pid.
        "ENGINE_RUNNER__WORKERS": "1",
        "ENGINE_API__WORKERS": "1",
        # No metrics ports (`engine up` would take 18081 and 18082): a test that wants one
        # sets its own free port.
        "ENGINE_RUNNER__METRICS_PORT": "0",
        "ENGINE_RELAY__METRICS_PORT": "0",
        "ENGINE_REDIS__KEY_PREFIX": settings.redis.key_prefix,
        "ENGINE_ELASTICSEARCH__INDEX_PREFIX": settings.elasticsearch.index_prefix,
    }


async def start_engine(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    """Start a long-running `engine` command in the background (output discarded)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine",
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def child_pids(pid: int) -> set[int]:
    """The pids of ``pid``'s children (from /proc); empty once it has exited."""
    found: set[int] = set()
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            found.update(int(c) for c in (task / "children").read_text().split())
    return found


@contextlib.asynccontextmanager
async def logged_engine(
    command: str, env: dict[str, str], log: Path, *options: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``engine COMMAND OPTIONS`` as a subprocess, its output (and its workers') in ``log``.

    On the way out, if it still runs: SIGTERM, at most 40 s, then SIGKILL for it
    and the workers it had.
    """
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "engine",
            command,
            *options,
            env={**os.environ, "COLUMNS": "250", **env},
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            children = child_pids(process.pid)
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 40)
            except TimeoutError:
                for pid in (process.pid, *children):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                await process.wait()


def supervised_engine(
    command: str, workers: int, env: dict[str, str], log: Path
) -> contextlib.AbstractAsyncContextManager[asyncio.subprocess.Process]:
    """``engine COMMAND --workers N`` as a subprocess, its output in ``log`` (see above)."""
    return logged_engine(command, env, log, "--workers", str(workers), "--log-level", "info")
