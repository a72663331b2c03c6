"""The seam between the stack manager and one service it runs."""

from __future__ import annotations

import signal
from typing import Protocol

from engine.stack.install import Report
from engine.stack.process import Launch


class Service(Protocol):
    """One native service of the local stack.

    The manager calls ``install`` and ``prepare`` (both idempotent), starts
    ``launch()`` detached, polls ``healthy`` until it holds, then calls
    ``after_start``. ``stop_signal`` is the signal that makes the service shut
    down cleanly and quickly.
    """

    name: str
    port: int
    os_user: str | None  # the system user it runs as; None for the caller
    port_setting: str
    stop_signal: signal.Signals

    def install(self, report: Report) -> None: ...

    def prepare(self, report: Report) -> None: ...

    def launch(self) -> Launch: ...

    def healthy(self) -> bool: ...

    def after_start(self, report: Report) -> None: ...
