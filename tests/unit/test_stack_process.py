"""Pid identity, spawning and stopping, with real processes."""

import signal
import socket
import sys
from pathlib import Path

from engine.stack.process import (
    Launch,
    ProcessId,
    port_is_free,
    read_pid_file,
    running,
    spawn,
    stop,
    tail,
    wait_until,
)

SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]


def test_spawned_process_is_recorded_and_stopped(tmp_path: Path) -> None:
    pid_file, log = tmp_path / "svc.pid", tmp_path / "svc.log"
    proc = spawn(Launch(argv=SLEEPER), log, pid_file)
    assert running(pid_file) == proc
    assert wait_until(lambda: "up" in log.read_text(), 10)
    assert stop(proc, signal.SIGTERM, timeout_s=10) is True
    assert running(pid_file) is None


def test_a_reused_pid_is_not_ours(tmp_path: Path) -> None:
    pid_file = tmp_path / "svc.pid"
    proc = spawn(Launch(argv=SLEEPER), tmp_path / "svc.log", pid_file)
    try:
        # Same pid, other start time: what a recycled pid looks like. down must not touch it.
        pid_file.write_text(f"{proc.pid} {proc.start_ticks + 1}\n")
        assert running(pid_file) is None
    finally:
        stop(proc, signal.SIGTERM, timeout_s=10)


def test_a_process_ignoring_its_signal_is_killed(tmp_path: Path) -> None:
    stubborn = [
        sys.executable,
        "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)",
    ]
    log = tmp_path / "svc.log"
    proc = spawn(Launch(argv=stubborn), log, tmp_path / "svc.pid")
    assert wait_until(lambda: "up" in log.read_text(), 10)
    assert stop(proc, signal.SIGTERM, timeout_s=0.5) is False
    assert running(tmp_path / "svc.pid") is None


def test_garbage_pid_file_reads_as_not_running(tmp_path: Path) -> None:
    pid_file = tmp_path / "svc.pid"
    pid_file.write_text("not a pid")
    assert read_pid_file(pid_file) is None
    assert running(pid_file) is None
    assert read_pid_file(tmp_path / "absent.pid") is None


def test_port_is_free_sees_a_listener() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert port_is_free(port) is False
    assert port_is_free(port) is True


def test_tail_returns_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail(log, 3) == "line 97\nline 98\nline 99"
    assert "no log" in tail(tmp_path / "missing.log")


def test_wait_until_gives_up_at_the_deadline() -> None:
    assert wait_until(lambda: False, 0.2, interval_s=0.05) is False
    assert ProcessId(1, 2) == ProcessId(1, 2)
