"""A store that stops answering is detached within ``stall_timeout_s``; a busy one is not.

Elasticsearch is frozen with SIGSTOP, not stopped: its sockets stay open and
every request simply gets no answer, which is what a hung store (GC pause, VM
freeze, a wedged disk) looks like to the daemon. A stopped store answers at
once with "connection refused" and is a different, easier case
(test_store_outage.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from engine.settings import Settings
from engine.stack import StackManager
from engine.stack.process import running


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (the Elasticsearch launcher and its server JVM)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        for child in children:
            found.extend(_tree(int(child)))
    return found


@asynccontextmanager
async def frozen_elasticsearch(settings: Settings) -> AsyncIterator[None]:
    """Elasticsearch frozen (SIGSTOP) inside the block, always resumed (SIGCONT) after it."""
    manager = StackManager(settings, lambda _line: None)
    proc = running(manager.layout.pid_file("elasticsearch"))
    if proc is None:
        pytest.skip("Elasticsearch is not run by the native local stack here; cannot freeze it")
    pids = _tree(proc.pid)
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


async def wait_for(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    """Wait until ``condition()`` is true, polling; fail naming ``what`` after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        await asyncio.sleep(0.05)
