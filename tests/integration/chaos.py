"""Engine processes for chaos tests: started, killed, stopped and watched, each with its log.

A :class:`Fleet` runs real ``engine`` commands (daemons, a relay) as
subprocesses. Each process has a name and a log file of its own (stdout and
stderr), so a failure can show what that process said. A process that exits
without being told to is an *unexpected exit*: it is recorded with its exit
code and the tail of its log, and restarted the way a supervisor would, so
the chaos goes on and the report can name it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class _Member:
    name: str
    args: tuple[str, ...]
    process: asyncio.subprocess.Process
    log: Path


@dataclass(frozen=True)
class Exit:
    """A process that ended without being asked to."""

    name: str
    code: int | None
    at_s: float
    """Seconds since the fleet was created."""
    log_tail: str


@dataclass
class Fleet:
    """Named ``engine`` subprocesses sharing one environment; logs under ``logs``."""

    env: dict[str, str]
    logs: Path
    members: dict[str, _Member] = field(default_factory=dict)
    exits: list[Exit] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    """What was done to whom, in order, with the time (for the test's report)."""
    _started: float = field(default_factory=time.monotonic)
    _numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def _note(self, what: str) -> None:
        self.events.append(f"{time.monotonic() - self._started:6.1f}s {what}")

    def new_name(self, prefix: str) -> str:
        return f"{prefix}-{next(self._numbers)}"

    def running(self, prefix: str) -> list[str]:
        return sorted(n for n in self.members if n.startswith(f"{prefix}-"))

    async def start(self, name: str, *args: str) -> None:
        log = self.logs / f"{name}.log"
        with log.open("ab") as handle:
            handle.write(f"=== engine {' '.join(args)} ===\n".encode())
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "engine",
                *args,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=handle,
                stderr=handle,
            )
        self.members[name] = _Member(name, args, process, log)
        self._note(f"start {name} (pid {process.pid})")

    async def kill(self, name: str) -> None:
        """SIGKILL: no shutdown, no final commit."""
        member = self.members.pop(name)
        with contextlib.suppress(ProcessLookupError):
            member.process.send_signal(signal.SIGKILL)
        await member.process.wait()
        self._note(f"SIGKILL {name}")

    async def stop(self, name: str, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (a clean leave); SIGKILL if it outlives ``timeout_s``. Its exit code."""
        member = self.members.pop(name)
        with contextlib.suppress(ProcessLookupError):
            member.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(member.process.wait(), timeout=timeout_s)
        except TimeoutError:
            member.process.kill()
            await member.process.wait()
            self._note(f"SIGTERM {name}: still running after {timeout_s}s, killed")
            return None
        self._note(f"SIGTERM {name}: exited {code}")
        return code

    async def revive(self) -> list[str]:
        """Record and restart every member that exited on its own; their names."""
        revived = []
        for name, member in list(self.members.items()):
            code = member.process.returncode
            if code is None:
                continue
            del self.members[name]
            self.exits.append(Exit(name, code, time.monotonic() - self._started, tail(member.log)))
            self._note(f"{name} exited on its own with {code}; restarted")
            await self.start(name, *member.args)
            revived.append(name)
        return revived

    async def kill_all(self) -> None:
        for name in list(self.members):
            await self.kill(name)

    def tails(self, lines: int = 15) -> str:
        """The last lines of every log, for a failure message."""
        return "\n".join(
            f"--- {path.name}\n{tail(path, lines)}" for path in sorted(self.logs.glob("*.log"))
        )


def tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])
