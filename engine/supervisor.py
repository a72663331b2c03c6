"""Several projection daemons in one consumer group under one supervisor: ``engine run --workers``.

(``engine api --workers`` uses the same supervisor for its server processes:
see :mod:`engine.cli.api`. What follows is written for the daemon; the API's
workers differ only in what they share, a listening socket instead of a
consumer group.)

Why processes, and why this is enough. One Python process applies events on
one core at most, and under load the daemon is CPU-bound (decoding, folding,
building each store's batch). Kafka's consumer group already shares a topic's
partitions between daemons and moves them when one leaves or dies, and every
guarantee of the daemon (offsets committed only for finished work, idempotent
and ordered writes in every store) already holds for several daemons in one
group. So a worker is exactly ``engine run --workers 1``, started N times:
nothing new is coordinated, and each worker names itself in
``engine_lane_states`` (host:pid:random, :func:`engine.lane_state.daemon_id`),
so ``engine status`` sees them all. The supervisor touches no event: it starts
workers, restarts them and stops them. With a metrics port it also serves the
workers' metrics, summed from their files (:mod:`engine.metrics`), and health
from its own status sample, over at most two Postgres connections of its own.

- **How many.** ``--workers`` or ``ENGINE_RUNNER__WORKERS``; 0 means one per
  core, but never more than the topic's partitions (``ENGINE_KAFKA__PARTITIONS``):
  a worker with no partition applies nothing yet holds its own connection
  pools (up to ``pool_max_size`` Postgres connections each), so on a large
  machine an uncapped default would only use up the server's connections. A
  number given explicitly is taken as it is (:func:`worker_count`).
- **A worker that dies is restarted**, after a capped, doubling delay
  (:class:`RestartPolicy`: 1 s, 2 s, ... 30 s, jittered), logged with its exit
  code or signal and how many times that slot was restarted. A worker that ran
  for ``STABLE_AFTER_S`` starts again from the shortest delay. The cap keeps a
  crash loop (a bug hit by one event, a store refusing a write) from spinning
  the CPU and the log while still coming back soon after the cause is fixed.
  Meanwhile the group gives the dead worker's partitions to the others once
  its session times out, and the new worker rejoins; a killed worker loses no
  committed work (the daemon commits only what its lanes finished).
- **Some exits are not retried**: bad arguments (2), configuration (3) and a
  service unreachable past ``startup_timeout_s`` (4). Every worker would hit
  the same thing again, and the code is what an operator or a process manager
  acts on, so the supervisor stops the other workers and exits with it (the
  codes are the caller's: :class:`Supervisor` is given them).
- **Stop.** SIGTERM or SIGINT to the supervisor sends SIGTERM to every worker;
  each finishes its in-flight batches and commits its offsets (its own clean
  shutdown, as for a single daemon). The supervisor waits for them, at most
  ``stop_timeout_s`` (the runner's ``shutdown_timeout_s`` plus a margin, the
  bound ``engine up`` gives its daemon), then SIGKILLs what is left. It exits 0
  when every worker exited 0, else 1.
- **Orphans.** Workers run in their own session, so a terminal's Ctrl-C
  reaches the supervisor alone and the stop is ordered by it: a worker that
  exited 0 on its own signal could otherwise be taken for one to restart. If
  the supervisor is SIGKILLed it forwards nothing, so each worker asks the
  kernel to SIGTERM it when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``,
  :func:`follow_supervisor`) and shuts down cleanly instead of consuming for
  ever with no supervisor. The worker makes that call itself, first thing
  (it is told the supervisor's pid by a hidden option), rather than in a
  ``preexec_fn`` of the spawn: ``preexec_fn`` runs Python between fork and
  exec, which is unsafe in a process with threads (the child watcher's). It
  then checks its parent is still the supervisor, which may have died before
  the call. Elsewhere a thread polls the parent's pid every second instead.
- **``--until-caught-up``** (burst mode) runs one process: "caught up" is a
  single daemon's judgement of its own partitions, and N workers would each
  stop at a different moment while the group moved partitions between them.
  With the number of workers from the setting or the default, burst mode
  simply runs one; an explicit ``--workers N`` (N > 1) with it is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from engine.retry import Backoff

log = logging.getLogger("engine.supervisor")

RESTART_INITIAL_S = 1.0
RESTART_MAX_S = 30.0
# A worker that ran this long was not crash-looping: its next restart starts short again.
STABLE_AFTER_S = 60.0
# Beyond the runner's shutdown_timeout_s: leaving the group and closing connections.
STOP_MARGIN_S = 5.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_PARENT_POLL_S = 1.0


def worker_count(requested: int, partitions: int, cores: int | None) -> int:
    """How many workers to run: ``requested``, or for 0 one per core up to ``partitions``."""
    if requested > 0:
        return requested
    return max(1, min(cores or 1, partitions))


def worker_command(
    log_level: str, supervisor_pid: int, command: str = "run", options: Sequence[str] = ()
) -> list[str]:
    """The command line of one worker: ``engine COMMAND`` as one process, told who supervises it.

    Settings reach the worker through the environment it inherits, so only the
    command's own options are forwarded (``options``, beyond the log level);
    ``engine run``'s ``--until-caught-up`` never is (see the module's docstring).
    """
    return [
        sys.executable,
        "-m",
        "engine",
        command,
        "--workers",
        "1",
        "--log-level",
        log_level,
        "--supervisor-pid",
        str(supervisor_pid),
        *options,
    ]


def describe_exit(returncode: int) -> str:
    """``exited with code 1`` or ``killed by SIGKILL`` (a negative code is the signal)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with code {returncode}"


class RestartPolicy:
    """The delay before restarting one worker slot: doubling while it keeps dying young."""

    def __init__(self, backoff: Backoff, *, stable_after_s: float = STABLE_AFTER_S) -> None:
        self._backoff = backoff
        self._stable_after_s = stable_after_s
        self.restarts = 0

    def next_delay(self, ran_for_s: float) -> float:
        """The wait before the next start of a worker that ran ``ran_for_s`` seconds."""
        if ran_for_s >= self._stable_after_s:
            self._backoff.reset()
        self.restarts += 1
        return self._backoff.next_delay()


def default_policy() -> RestartPolicy:
    return RestartPolicy(Backoff(RESTART_INITIAL_S, RESTART_MAX_S))


@dataclass
class _Slot:
    """One worker position: its restart history, and how its last worker ended."""

    number: int
    policy: RestartPolicy
    final: int | None = None  # its last worker's exit code, once the supervisor stopped


class Supervisor:
    """Keeps ``workers`` copies of ``command`` running until a stop; see the module docstring."""

    def __init__(
        self,
        command: Sequence[str],
        workers: int,
        *,
        stop_timeout_s: float,
        fatal_codes: Collection[int],
        policy: Callable[[], RestartPolicy] = default_policy,
        pass_fds: Collection[int] = (),
        env: Mapping[str, str] | None = None,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        self._command = list(command)
        # Descriptors every worker inherits (the API's listening socket).
        self._pass_fds = tuple(pass_fds)
        # Variables set for the workers on top of this process's environment (the
        # workers' metrics directory, engine.metrics), and a call with each worker's pid
        # once it has exited (its metric files marked dead).
        self._env = None if env is None else {**os.environ, **env}
        self._on_exit = on_exit
        self._stop_timeout_s = stop_timeout_s
        self._fatal_codes = frozenset(fatal_codes)
        self._slots = [_Slot(n, policy()) for n in range(1, workers + 1)]
        self._fatal: int | None = None

    async def run(self, stop: asyncio.Event) -> int:
        """Run the workers until ``stop`` or a fatal exit; the supervisor's exit code.

        After a stop: 0 when every worker then exited 0, else 1. After a fatal
        exit: that worker's code.
        """
        halt = asyncio.Event()  # a stop was asked for, or a worker exited with a fatal code
        keepers = [
            asyncio.create_task(self._keep(slot, halt), name=f"worker {slot.number}")
            for slot in self._slots
        ]
        stopping = asyncio.create_task(stop.wait())
        try:
            # Any keeper returning early (a fatal exit, a failed spawn) ends the whole run.
            await asyncio.wait([stopping, *keepers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            halt.set()
            stopping.cancel()
            outcomes = await asyncio.gather(*keepers, return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        for exc in failed:
            log.error("supervising a worker failed: %r", exc)
        if self._fatal is not None:
            return self._fatal
        clean = not failed and all(s.final == 0 for s in self._slots)
        if clean:
            log.info("all %d workers stopped cleanly", len(self._slots))
        return 0 if clean else 1

    async def _keep(self, slot: _Slot, halt: asyncio.Event) -> None:
        """Run ``slot``'s worker, restarting it, until ``halt``; then stop it."""
        loop = asyncio.get_running_loop()
        while not halt.is_set():
            started = loop.time()
            process = await self._spawn(slot)
            code = await _exit_or_halt(process, halt)
            if code is None:  # halted: this worker is stopped, not restarted
                slot.final = await self._stop(slot, process)
                self._exited(process)
                return
            self._exited(process)
            if halt.is_set():
                slot.final = code
                return
            what = describe_exit(code)
            if code in self._fatal_codes:
                log.error(
                    "worker %d (pid %d) %s: not restarting it; stopping the other workers",
                    slot.number,
                    process.pid,
                    what,
                )
                self._fatal = code
                slot.final = code
                return
            ran_for = loop.time() - started
            delay = slot.policy.next_delay(ran_for)
            log.warning(
                "worker %d (pid %d) %s after %.1f s; restarting it in %.1f s (restart %d)",
                slot.number,
                process.pid,
                what,
                ran_for,
                delay,
                slot.policy.restarts,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(halt.wait(), delay)

    def _exited(self, process: asyncio.subprocess.Process) -> None:
        if self._on_exit is not None:
            try:
                self._on_exit(process.pid)
            except Exception:
                log.exception("after worker (pid %d) exited", process.pid)

    async def _spawn(self, slot: _Slot) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            *self._command,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # signals come from the supervisor only (see the docstring)
            pass_fds=self._pass_fds,
            env=self._env,
        )
        log.info("worker %d started (pid %d)", slot.number, process.pid)
        return process

    async def _stop(self, slot: _Slot, process: asyncio.subprocess.Process) -> int:
        """SIGTERM, wait at most ``stop_timeout_s``, then SIGKILL; the exit code."""
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            return await asyncio.wait_for(process.wait(), self._stop_timeout_s)
        except TimeoutError:
            log.error(
                "worker %d (pid %d) did not stop within %.0f s: killing it",
                slot.number,
                process.pid,
                self._stop_timeout_s,
            )
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            return -signal.SIGKILL


async def _exit_or_halt(process: asyncio.subprocess.Process, halt: asyncio.Event) -> int | None:
    """The worker's exit code when it exits first; ``None`` when ``halt`` comes first."""
    exited = asyncio.ensure_future(process.wait())
    halted = asyncio.ensure_future(halt.wait())
    try:
        await asyncio.wait({exited, halted}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        halted.cancel()
        if not exited.done():
            exited.cancel()
    return exited.result() if exited.done() and not exited.cancelled() else None


# -- the worker's side -----------------------------------------------------------------


def follow_supervisor(supervisor_pid: int) -> None:
    """In a worker: be sent SIGTERM when the supervisor dies, even of SIGKILL.

    Call it after the stop signals are caught, so the SIGTERM stops the worker
    cleanly. See the module docstring for why the worker does this itself.
    """
    if not (sys.platform == "linux" and _set_parent_death_signal(signal.SIGTERM)):
        threading.Thread(
            target=_watch_parent, args=(supervisor_pid,), name="parent watch", daemon=True
        ).start()
    if os.getppid() != supervisor_pid:  # it died before the kernel was asked to tell us
        os.kill(os.getpid(), signal.SIGTERM)


def _set_parent_death_signal(sig: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0:
            return True
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d)", ctypes.get_errno())
    except (OSError, AttributeError) as exc:
        log.warning("prctl(PR_SET_PDEATHSIG) is not available: %s", exc)
    return False


def _watch_parent(supervisor_pid: int) -> None:
    while os.getppid() == supervisor_pid:
        time.sleep(_PARENT_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)
