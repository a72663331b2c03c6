"""`engine run --workers 2`: two daemons in one consumer group under a supervisor.

The real command runs as a subprocess, its output (the supervisor's and its
workers') in a log file. The workers are the supervisor's children, read from
/proc; each names itself in ``engine_lane_states`` (host:pid:random), which is
how the test sees that both joined the group and what partitions each holds.
Stores are compared with a fold of the whole event log, so an event applied
twice or not at all shows up as a difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

from engine import CommandBus, OutboxRelay, Resources, Settings
from engine.lane_state import LaneState
from engine.status import collect_status
from projections.orders import APP
from tests.helpers import child_pids, run_engine, settings_env, supervised_engine
from tests.integration.folded import assert_stores_equal_the_log
from tests.integration.read.expected import eventually
from tests.integration.read.faults import assert_committed_to_the_end, wait_for
from tests.integration.read.scenario import populate

pytestmark = pytest.mark.timeout(150)


def _env(settings: Settings) -> dict[str, str]:
    return {
        **settings_env(settings),
        "ENGINE_RUNNER__WORKERS": "2",
        # Lane states every half second; a killed worker's partitions move after 6 s.
        "ENGINE_RUNNER__STATE_INTERVAL_S": "0.5",
        "ENGINE_RUNNER__SESSION_TIMEOUT_S": "6",
        "ENGINE_RUNNER__SHUTDOWN_TIMEOUT_S": "10",
    }


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@dataclass
class _Supervisor:
    process: asyncio.subprocess.Process
    log: Path

    def output(self) -> str:
        return " ".join(self.log.read_text(errors="replace").split())

    def workers(self) -> set[int]:
        return child_pids(self.process.pid)

    async def two_workers(self, timeout_s: float = 30) -> set[int]:
        await wait_for(lambda: len(self.workers()) == 2, "two workers", timeout_s)
        return self.workers()

    async def exit_code(self, timeout_s: float) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            raise AssertionError(f"still running:\n{self.output()[-3000:]}") from None


@contextlib.asynccontextmanager
async def _supervisor(tmp_path: Path, env: dict[str, str]) -> AsyncIterator[_Supervisor]:
    log = tmp_path / "run.log"
    async with supervised_engine("run", 2, env, log) as process:
        yield _Supervisor(process, log)


async def _daemons(pool: asyncpg.Pool) -> dict[int, set[int]]:
    """Per daemon pid, the partitions its lanes hold (from the rows ``engine status`` reads)."""
    held: dict[int, set[int]] = {}
    for row in await pool.fetch("SELECT daemon, partitions FROM engine_lane_states"):
        pid = int(row["daemon"].split(":")[1])  # host:pid:random
        held.setdefault(pid, set()).update(row["partitions"])
    return held


async def _stable_group(settings: Settings, members: int) -> set[str]:
    """The group is stable with ``members`` consumers, each assigned partitions, all assigned.

    Events written after this reach workers that keep their partitions, so each
    worker's lanes see events of their own (what ``engine_lane_states`` shows).
    Returns the members' ids (a consumer keeps its id across rebalances).
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([settings.runner.group_id])
    finally:
        await admin.close()
    group = response.to_object()["groups"][0]
    assert group["state"] == "Stable", group
    held = [
        {
            partition
            for _topic, partitions in ConsumerProtocolMemberAssignment.decode(
                member["member_assignment"]
            ).assignment
            for partition in partitions
        }
        for member in group["members"]
    ]
    assert len(held) == members and all(held), held
    assert set().union(*held) == set(range(settings.kafka.partitions)), held
    return {member["member_id"] for member in group["members"]}


async def _write(bus: CommandBus, settings: Settings, orders: int, seed: int) -> None:
    await populate(bus, orders=orders, seed=seed)
    await OutboxRelay(settings.postgres, settings.kafka, settings.relay).drain()


async def _caught_up(settings: Settings, resources: Resources) -> None:
    status = await collect_status(settings, APP, resources)
    assert {(p.name, p.state, p.lag_events) for p in status.projections} == {
        (p.name, LaneState.ATTACHED, 0) for p in status.projections
    }


async def _each_worker_holds_partitions(
    pool: asyncpg.Pool, workers: set[int], partitions: int
) -> None:
    # A SIGKILLed worker's rows stay until they are forgotten: look at the live ones.
    held = {pid: parts for pid, parts in (await _daemons(pool)).items() if pid in workers}
    assert set(held) == workers, (held, workers)
    assert all(held.values()), held
    assert set().union(*held.values()) == set(range(partitions)), held


async def test_two_workers_share_the_group_apply_every_event_once_and_stop_on_sigterm(
    bus: CommandBus,
    pool: asyncpg.Pool,
    settings_for_test: Settings,
    resources: Resources,
    tmp_path: Path,
) -> None:
    settings = settings_for_test
    async with _supervisor(tmp_path, _env(settings)) as supervisor:
        workers = await supervisor.two_workers()
        assert supervisor.process.pid not in workers
        await eventually(lambda: _stable_group(settings, members=2), timeout_s=60)
        await _write(bus, settings, orders=12, seed=61)
        await eventually(lambda: _caught_up(settings, resources), timeout_s=60)
        # Both name themselves to engine status, and each applied events of its partitions.
        await eventually(
            lambda: _each_worker_holds_partitions(pool, workers, settings.kafka.partitions),
            timeout_s=10,
        )
        assert supervisor.workers() == workers, supervisor.output()[-3000:]
        await assert_stores_equal_the_log(APP, resources)

        supervisor.process.send_signal(signal.SIGTERM)
        assert await supervisor.exit_code(timeout_s=40) == 0, supervisor.output()[-3000:]
    assert not any(_alive(pid) for pid in workers)
    assert "all 2 workers stopped cleanly" in supervisor.output()
    # Each worker's own clean shutdown committed its offsets and removed its rows.
    await assert_committed_to_the_end(settings)
    assert await _daemons(pool) == {}


async def test_a_killed_worker_is_restarted_and_applies_what_comes_after(
    bus: CommandBus,
    pool: asyncpg.Pool,
    settings_for_test: Settings,
    resources: Resources,
    tmp_path: Path,
) -> None:
    settings = settings_for_test
    async with _supervisor(tmp_path, _env(settings)) as supervisor:
        workers = await supervisor.two_workers()
        await eventually(lambda: _stable_group(settings, members=2), timeout_s=60)
        before = await _stable_group(settings, members=2)
        await _write(bus, settings, orders=4, seed=62)
        await eventually(lambda: _caught_up(settings, resources), timeout_s=60)

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        await wait_for(
            lambda: len(supervisor.workers()) == 2 and victim not in supervisor.workers(),
            "the killed worker to be replaced",
            timeout_s=30,
        )
        replacement = supervisor.workers() - workers
        assert len(replacement) == 1, (workers, supervisor.workers())
        assert f"(pid {victim}) killed by SIGKILL" in supervisor.output()
        assert "(restart 1)" in supervisor.output()

        async def victim_replaced_in_the_group() -> None:
            # The killed worker stays a member until its session times out (6 s).
            now = await _stable_group(settings, members=2)
            assert len(now & before) == 1, (now, before)  # the survivor and a newcomer

        await eventually(victim_replaced_in_the_group, timeout_s=60)
        await _write(bus, settings, orders=12, seed=63)
        survivors = supervisor.workers()
        await eventually(lambda: _caught_up(settings, resources), timeout_s=60)
        await eventually(
            lambda: _each_worker_holds_partitions(pool, survivors, settings.kafka.partitions),
            timeout_s=10,
        )
        await assert_stores_equal_the_log(APP, resources)

        supervisor.process.send_signal(signal.SIGTERM)
        assert await supervisor.exit_code(timeout_s=40) == 0, supervisor.output()[-3000:]


async def test_a_configuration_error_exits_3_without_a_restart_loop(
    settings_for_test: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    env = _env(settings_for_test)
    # Refused by the supervisor itself: no worker is started.
    code, _out, err = await run_engine(
        "run", "--workers", "2", env={**env, "ENGINE_RUNNER__BATCH_SIZE": "0"}, timeout_s=30
    )
    assert code == 3, err
    assert "ENGINE_* variables" in " ".join(err.split())

    # Found by the workers (the supervisor does not load the application): each
    # exits 3, and the supervisor stops and exits 3 instead of restarting them.
    broken = {**env, "ENGINE_APP": "tests.no_such_module:APP"}
    async with _supervisor(tmp_path, broken) as supervisor:
        assert await supervisor.exit_code(timeout_s=60) == 3, supervisor.output()[-3000:]
    output = supervisor.output()
    assert "exited with code 3: not restarting it" in output
    assert output.count(" started (pid ") <= 2  # "worker N started (pid P)": once per slot
    assert "restarting it in" not in output
