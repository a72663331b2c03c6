"""The supervisor's logic: how many workers, their command line, restart delays, and the
restart/stop/fatal rules against real (tiny) child processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
from typer.models import OptionInfo

from engine.cli.api import api
from engine.cli.run import run
from engine.retry import Backoff
from engine.supervisor import (
    RestartPolicy,
    Supervisor,
    describe_exit,
    worker_command,
    worker_count,
)


def test_zero_workers_means_one_per_core_but_no_more_than_the_partitions() -> None:
    assert worker_count(0, partitions=6, cores=4) == 4
    assert worker_count(0, partitions=3, cores=64) == 3
    assert worker_count(0, partitions=6, cores=None) == 1
    # Asked for explicitly: taken as it is.
    assert worker_count(8, partitions=3, cores=2) == 8
    assert worker_count(1, partitions=6, cores=16) == 1


def test_a_worker_is_engine_run_as_one_process_told_its_supervisor_and_log_level() -> None:
    command = worker_command("warning", 4242)
    assert command[:4] == [sys.executable, "-m", "engine", "run"]
    options = command[4:]
    assert options[options.index("--workers") + 1] == "1"
    assert options[options.index("--log-level") + 1] == "warning"
    assert options[options.index("--supervisor-pid") + 1] == "4242"
    assert "--until-caught-up" not in command


def _options(command: typing.Callable[..., None]) -> set[str]:
    """The command's long options: declared ones, else typer's from the parameter's name."""
    hints = typing.get_type_hints(command, include_extras=True)
    found: set[str] = set()
    for name, hint in hints.items():
        for meta in getattr(hint, "__metadata__", ()):
            if not isinstance(meta, OptionInfo):
                continue
            # In Annotated form typer takes the first name as the "default" slot.
            declared = [
                d
                for d in (meta.default, *(meta.param_decls or ()))
                if isinstance(d, str) and d.startswith("--")
            ]
            found.update(declared or [f"--{name.replace('_', '-')}"])
    return found


def test_every_option_of_engine_run_is_either_forwarded_to_workers_or_deliberately_not() -> None:
    options = _options(run)
    assert "--log-level" in options  # the inspection sees the command's options
    forwarded = {o for o in worker_command("info", 1) if o.startswith("--")}
    # --until-caught-up never reaches a worker: burst mode runs one process, no supervisor.
    # --metrics-port neither: the supervisor serves the port for all its workers.
    assert options - forwarded == {"--until-caught-up", "--metrics-port"}, (
        "a new option of engine run: forward it in engine.supervisor.worker_command, or say why not"
    )


def test_every_option_of_engine_api_is_either_forwarded_to_workers_or_deliberately_not() -> None:
    forwarded = {o for o in worker_command("info", 1, "api", ["--fd", "7"]) if o.startswith("--")}
    # --host and --port never reach a worker: the supervisor binds and passes the socket.
    assert _options(api) - forwarded == {"--host", "--port"}, (
        "a new option of engine api: forward it in engine.cli.api._supervise, or say why not"
    )


def test_restart_delays_double_up_to_the_cap_and_start_again_after_a_stable_run() -> None:
    policy = RestartPolicy(Backoff(1.0, 8.0, jitter=lambda: 1.0), stable_after_s=60.0)
    assert [policy.next_delay(ran_for_s=2.0) for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    assert policy.next_delay(ran_for_s=61.0) == 1.0
    assert policy.next_delay(ran_for_s=1.0) == 2.0
    assert policy.restarts == 8


def test_an_exit_is_described_by_its_code_or_its_signal() -> None:
    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"


# -- against child processes (a few lines of Python each) -------------------------------


def _fast() -> RestartPolicy:
    return RestartPolicy(Backoff(0.05, 0.05))


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


async def test_a_worker_exiting_with_a_fatal_code_is_not_restarted(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    code = f"open({str(starts)!r}, 'a').write('x\\n'); raise SystemExit(3)"
    supervisor = Supervisor(_python(code), 1, stop_timeout_s=5, fatal_codes={3, 4}, policy=_fast)
    assert await asyncio.wait_for(supervisor.run(asyncio.Event()), timeout=20) == 3
    assert starts.read_text().split() == ["x"]


async def test_a_fatal_exit_stops_the_other_workers_at_once(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    # The first to start exits 4 (a service unreachable); any other waits for a signal.
    code = (
        "import time\n"
        f"with open({str(starts)!r}, 'a') as f: f.write('x\\n')\n"
        f"if len(open({str(starts)!r}).read().split()) == 1: raise SystemExit(4)\n"
        "time.sleep(30)\n"
    )
    supervisor = Supervisor(_python(code), 3, stop_timeout_s=10, fatal_codes={3, 4}, policy=_fast)
    started = time.monotonic()
    assert await asyncio.wait_for(supervisor.run(asyncio.Event()), timeout=20) == 4
    assert time.monotonic() - started < 5  # the others were terminated, not waited out
    assert len(starts.read_text().split()) <= 3  # none restarted


async def test_a_worker_that_dies_is_restarted(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    # Dies by SIGKILL on its first two starts, then stays up until SIGTERM.
    code = (
        "import os, signal, sys, time\n"
        f"with open({str(starts)!r}, 'a') as f: f.write('x\\n')\n"
        f"if len(open({str(starts)!r}).read().split()) <= 2: os.kill(os.getpid(), 9)\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
        "time.sleep(30)\n"
    )
    supervisor = Supervisor(_python(code), 1, stop_timeout_s=5, fatal_codes={3}, policy=_fast)
    stop = asyncio.Event()
    running = asyncio.create_task(supervisor.run(stop))
    deadline = time.monotonic() + 20
    while not starts.exists() or len(starts.read_text().split()) < 3:
        assert time.monotonic() < deadline, "the worker was not restarted twice"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # the third one is up, past its two deaths
    stop.set()
    assert await asyncio.wait_for(running, timeout=10) == 0
    assert len(starts.read_text().split()) == 3


async def test_a_stop_terminates_every_worker_and_kills_one_that_ignores_it(
    tmp_path: Path,
) -> None:
    started = tmp_path / "started"
    stubborn = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"open({str(started)!r}, 'a').write('x\\n')\n"
        "time.sleep(60)\n"
    )
    supervisor = Supervisor(_python(stubborn), 2, stop_timeout_s=0.5, fatal_codes={3}, policy=_fast)
    stop = asyncio.Event()
    running = asyncio.create_task(supervisor.run(stop))
    deadline = time.monotonic() + 20
    while not started.exists() or len(started.read_text().split()) < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    stop.set()
    # Both ignored SIGTERM and were killed after the bound: not a clean stop.
    assert await asyncio.wait_for(running, timeout=10) == 1


def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie no one reaped (no init in a container) is dead too


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_gets_sigterm_when_its_supervisor_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "worker.pid"
    worker = (
        "import os, time\n"
        "from engine.supervisor import follow_supervisor\n"
        "follow_supervisor(os.getppid())\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(60)\n"
    )
    parent = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {worker!r}])\n"
        "time.sleep(60)\n"
    )
    supervisor = subprocess.Popen([sys.executable, "-c", parent], cwd=Path.cwd())
    try:
        deadline = time.monotonic() + 20
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.05)
        worker_pid = int(pid_file.read_text())
        assert not _dead(worker_pid)
    finally:
        supervisor.kill()
        supervisor.wait()
    deadline = time.monotonic() + 5
    while not _dead(worker_pid):
        if time.monotonic() > deadline:
            os.kill(worker_pid, signal.SIGKILL)
            pytest.fail("the worker outlived its killed supervisor")
        time.sleep(0.05)
