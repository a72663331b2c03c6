"""Starting, identifying and stopping the stack's own processes.

A pid alone is not an identity: after a reboot or a long time the kernel
reuses pids, and ``down`` must never signal a stranger. A pid file therefore
stores the pid *and* the process's start time (field 22 of
``/proc/<pid>/stat``, in clock ticks since boot); a process is ours only while
both match.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ProcessId:
    """A running process as the stack recorded it."""

    pid: int
    start_ticks: int


@dataclass(frozen=True)
class Launch:
    """How to run one service in the foreground (the stack detaches it)."""

    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    os_user: str | None = None


class _DetachedPopen(subprocess.Popen[bytes]):
    """A child meant to outlive this handle: the stack tracks it by pid file, not by Popen.

    Popen warns when a handle of a running child is collected; here that is the
    intent. When this process does outlive the child (tests), ``stop`` reaps it.
    """

    def __del__(self) -> None:
        return None


def identity_of(os_user: str | None) -> tuple[int | None, int | None, list[int] | None]:
    """``user``, ``group`` and ``extra_groups`` for subprocess: run as ``os_user`` if given.

    Supplementary groups are dropped too, or the child would keep root's groups.
    """
    if os_user is None:
        return None, None, None
    entry = pwd.getpwnam(os_user)
    return entry.pw_uid, entry.pw_gid, []


def _reap(pid: int) -> None:
    """Collect the exit status if ``pid`` is our own child, so it leaves no zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie has exited already
        return None
    return int(fields[19])


def read_pid_file(path: Path) -> ProcessId | None:
    try:
        pid_text, ticks_text = path.read_text().split()
        return ProcessId(int(pid_text), int(ticks_text))
    except (OSError, ValueError):
        return None


def is_alive(proc: ProcessId) -> bool:
    return _start_ticks(proc.pid) == proc.start_ticks


def running(pid_file: Path) -> ProcessId | None:
    """The process recorded in ``pid_file`` if it is still the same process, else None."""
    proc = read_pid_file(pid_file)
    if proc is not None and is_alive(proc):
        return proc
    return None


def spawn(launch: Launch, log_file: Path, pid_file: Path) -> ProcessId:
    """Start ``launch`` detached (own session), output appended to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", **launch.env}
    if launch.os_user is not None:
        env["HOME"] = pwd.getpwnam(launch.os_user).pw_dir
    user, group, extra_groups = identity_of(launch.os_user)
    with log_file.open("ab") as log:
        child = _DetachedPopen(
            list(launch.argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=launch.cwd,
            env=env,
            start_new_session=True,  # survives the CLI; its own process group for stop()
            user=user,
            group=group,
            extra_groups=extra_groups,
        )
    ticks = _start_ticks(child.pid)
    proc = ProcessId(child.pid, ticks if ticks is not None else -1)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(f"{proc.pid} {proc.start_ticks}\n")
    return proc


def stop(proc: ProcessId, sig: signal.Signals, timeout_s: float) -> bool:
    """Ask ``proc`` to stop with ``sig``; kill its process group if it outlives ``timeout_s``.

    Returns True if it stopped on its own, False if it had to be killed.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
    if wait_until(lambda: not is_alive(proc), timeout_s, interval_s=0.2):
        _reap(proc.pid)
        return True
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    wait_until(lambda: not is_alive(proc), 10.0, interval_s=0.1)
    _reap(proc.pid)
    return False


def wait_until(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.5) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes; never sleeps past the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(interval_s, remaining))


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing accepts connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) != 0


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file, or a note that it has none."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])
