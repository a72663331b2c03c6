"""Redis from Debian's ``redis-server`` package, as a project-local instance."""

from __future__ import annotations

import shutil
import signal
import socket

from engine.settings import Settings, env_var
from engine.stack.install import Report, apt_install
from engine.stack.layout import StackLayout
from engine.stack.process import Launch
from engine.stack.versions import REDIS_PACKAGE


class RedisService:
    name = "redis"
    stop_signal = signal.SIGTERM  # Redis saves and exits on SIGTERM
    os_user: str | None = None

    def __init__(self, settings: Settings, layout: StackLayout) -> None:
        self.port = settings.redis.port
        self.port_setting = env_var("redis", "port")
        self._dir = layout.service_dir(self.name)

    def install(self, report: Report) -> None:
        if shutil.which("redis-server") is None:
            apt_install([REDIS_PACKAGE], report)

    def prepare(self, report: Report) -> None:
        data = self._dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        # Written every time so a changed port in the settings takes effect.
        (self._dir / "redis.conf").write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {self.port}",
                    "daemonize no",
                    f"dir {data.resolve()}",
                    # Append-only file: what the engine wrote survives a restart.
                    "appendonly yes",
                    "appendfsync everysec",
                    'save ""',
                    'logfile ""',
                    "",
                ]
            )
        )

    def launch(self) -> Launch:
        server = shutil.which("redis-server") or "redis-server"
        return Launch(argv=[server, str((self._dir / "redis.conf").resolve())])

    def healthy(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def after_start(self, report: Report) -> None:
        return None
