"""The native local stack: install, start, check, stop and wipe the four services.

``up`` is idempotent: services already running (by their recorded pid) are
only health-checked; the rest are installed if needed, started together and
waited for until healthy. ``down`` signals only processes this stack started,
identified by pid *and* start time. Nothing here touches the system's own
Postgres or Redis services.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ConfigurationError, PortInUseError, StackError
from engine.settings import Settings, env_var
from engine.stack.install import Report
from engine.stack.layout import StackLayout
from engine.stack.process import port_is_free, running, spawn, stop, tail, wait_until
from engine.stack.services.base import Service
from engine.stack.services.elasticsearch import ElasticsearchService
from engine.stack.services.kafka import KafkaService
from engine.stack.services.postgres import PostgresService
from engine.stack.services.redis import RedisService

SERVICE_NAMES = ("postgres", "redis", "kafka", "elasticsearch")


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    port: int
    pid: int | None
    healthy: bool
    log: Path

    @property
    def state(self) -> str:
        if self.pid is None:
            return "stopped"
        return "healthy" if self.healthy else "starting or unhealthy"


def build_services(settings: Settings, layout: StackLayout) -> list[Service]:
    return [
        PostgresService(settings, layout),
        RedisService(settings, layout),
        KafkaService(settings, layout),
        ElasticsearchService(settings, layout),
    ]


class StackManager:
    """Runs the local stack described by ``settings``; progress goes to ``report``."""

    def __init__(self, settings: Settings, report: Report) -> None:
        self._settings = settings
        self._report = report
        self.layout = StackLayout(settings.stack.data_dir)
        self._services = build_services(settings, self.layout)

    def select(self, names: Iterable[str] = ()) -> list[Service]:
        wanted = list(names)
        unknown = sorted(set(wanted) - set(SERVICE_NAMES))
        if unknown:
            raise ConfigurationError(
                f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(SERVICE_NAMES)}"
            )
        return [s for s in self._services if not wanted or s.name in wanted]

    def up(self, names: Iterable[str] = ()) -> None:
        services = self.select(names)
        self.layout.ensure()
        to_start = [s for s in services if running(self.layout.pid_file(s.name)) is None]
        self._check_service_users_can_reach_data(to_start)
        for service in to_start:
            if not port_is_free(service.port):
                raise PortInUseError(service.name, service.port, service.port_setting)
        for service in to_start:
            service.install(self._report)
            service.prepare(self._report)
        for service in to_start:
            self._report(f"starting {service.name} on 127.0.0.1:{service.port}")
            log = self.layout.log_file(service.name)
            with log.open("a") as handle:
                handle.write(f"\n=== engine stack: starting {service.name} at {time.ctime()} ===\n")
            spawn(service.launch(), log, self.layout.pid_file(service.name))
        for service in services:
            self._wait_healthy(service)
        for service in to_start:
            service.after_start(self._report)
        for service in services:
            self._report(f"{service.name} is healthy on 127.0.0.1:{service.port}")

    def _wait_healthy(self, service: Service) -> None:
        pid_file = self.layout.pid_file(service.name)
        timeout = self._settings.stack.start_timeout_s

        def ready_or_dead() -> bool:
            return running(pid_file) is None or service.healthy()

        wait_until(ready_or_dead, timeout, interval_s=0.5)
        log = self.layout.log_file(service.name)
        if running(pid_file) is None:
            raise StackError(
                service.name, f"the process exited during start-up (log: {log})", tail(log)
            )
        if not service.healthy():
            raise StackError(
                service.name,
                f"not healthy after {timeout:.0f}s (log: {log}; raise "
                f"{env_var('stack', 'start_timeout_s')} on a slow machine)",
                tail(log),
            )

    def down(self, names: Iterable[str] = ()) -> None:
        for service in reversed(self.select(names)):
            pid_file = self.layout.pid_file(service.name)
            proc = running(pid_file)
            if proc is None:
                self._report(f"{service.name} is not running")
            else:
                clean = stop(proc, service.stop_signal, self._settings.stack.stop_timeout_s)
                self._report(
                    f"{service.name} stopped" + ("" if clean else " (killed after timeout)")
                )
            pid_file.unlink(missing_ok=True)

    def status(self, names: Iterable[str] = ()) -> list[ServiceStatus]:
        result = []
        for service in self.select(names):
            proc = running(self.layout.pid_file(service.name))
            result.append(
                ServiceStatus(
                    name=service.name,
                    port=service.port,
                    pid=proc.pid if proc else None,
                    healthy=proc is not None and service.healthy(),
                    log=self.layout.log_file(service.name),
                )
            )
        return result

    def reset(self, names: Iterable[str] = ()) -> None:
        """Stop the services and wipe their data; downloaded distributions are kept."""
        services = self.select(names)
        self.down([s.name for s in services])
        for service in services:
            folder = self.layout.service_dir(service.name)
            if folder.exists():
                shutil.rmtree(folder)
            self.layout.log_file(service.name).unlink(missing_ok=True)
            self._report(f"{service.name}: data wiped")

    def _check_service_users_can_reach_data(self, services: Sequence[Service]) -> None:
        """Services that run as other users (Postgres, ES) must be able to enter the folder."""
        if os.geteuid() != 0 or not any(s.os_user for s in services):
            return
        blocked = _untraversable_ancestors(self.layout.root.resolve())
        if blocked:
            raise ConfigurationError(
                f"the stack folder {self.layout.root.resolve()} is inside {blocked[0]}, which "
                "other users cannot enter, but Postgres and Elasticsearch must run as non-root "
                "users. "
                f"Set {env_var('stack', 'data_dir')} to a folder they can reach "
                "(for example /var/tmp/engine-stack)."
            )


def _untraversable_ancestors(path: Path) -> Sequence[Path]:
    return [p for p in path.parents if not os.stat(p).st_mode & stat.S_IXOTH]
