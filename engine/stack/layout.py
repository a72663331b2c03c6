"""Where the local stack keeps everything: one project-local folder, ignored by git."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StackLayout:
    """Paths under the stack's data folder (``.stack/`` by default).

    ``dist/`` holds downloaded distributions (kept by ``reset``); each service
    has its own folder for data and configuration; ``logs/`` and ``run/`` hold
    each process's output and pid file.
    """

    root: Path

    @property
    def dist(self) -> Path:
        return self.root / "dist"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def service_dir(self, service: str) -> Path:
        return self.root / service

    def log_file(self, service: str) -> Path:
        return self.logs / f"{service}.log"

    def pid_file(self, service: str) -> Path:
        return self.run / f"{service}.pid"

    def ensure(self) -> None:
        for folder in (self.root, self.dist, self.logs, self.run):
            folder.mkdir(parents=True, exist_ok=True)
        # The service users (postgres, engine-es) must be able to enter it whatever the umask.
        self.root.chmod(0o755)
