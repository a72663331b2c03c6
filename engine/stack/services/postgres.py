"""PostgreSQL from Debian's packages, as a project-local cluster on its own port.

The cluster is created with ``initdb`` under the stack folder and run by the
``postgres`` system user (Postgres refuses to run as root); the system's own
cluster and service, if any, are left alone.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from pathlib import Path

from engine.errors import MissingToolError
from engine.settings import Settings, env_var
from engine.stack.install import Report, apt_install, chown_tree, run_checked
from engine.stack.layout import StackLayout
from engine.stack.process import Launch
from engine.stack.versions import POSTGRES_PACKAGE

_PG_ROOT = Path("/usr/lib/postgresql")


def find_bin_dir() -> Path | None:
    """The bin folder of the newest PostgreSQL server Debian installed, if any."""
    candidates = [p.parent for p in _PG_ROOT.glob("*/bin/postgres")]
    numbered = [c for c in candidates if re.fullmatch(r"\d+", c.parent.name)]
    if not numbered:
        return None
    return max(numbered, key=lambda c: int(c.parent.name))


class PostgresService:
    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: SIGTERM would wait for every client

    def __init__(self, settings: Settings, layout: StackLayout) -> None:
        self._pg = settings.postgres
        self.os_user: str | None = settings.stack.postgres_os_user
        self._os_user = settings.stack.postgres_os_user
        self.port = settings.postgres.port
        self.port_setting = env_var("postgres", "port")
        self._dir = layout.service_dir(self.name)

    @property
    def _data(self) -> Path:
        return self._dir / "data"

    @property
    def _marker(self) -> Path:
        return self._dir / "initialized"

    def _bin(self, program: str) -> str:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise MissingToolError(
                "postgres", "for the local stack", "Run 'engine stack up' as root."
            )
        return str(bin_dir / program)

    def install(self, report: Report) -> None:
        if find_bin_dir() is None:
            apt_install([POSTGRES_PACKAGE], report)

    def prepare(self, report: Report) -> None:
        if self._marker.exists():
            return
        if self._dir.exists():
            shutil.rmtree(self._dir)  # an initdb that never finished: start over
        (self._dir / "run").mkdir(parents=True)
        password_file = self._dir / "pwfile"
        password_file.write_text(self._pg.password.get_secret_value() + "\n")
        chown_tree(self._dir, self._os_user)
        report("creating the PostgreSQL cluster (initdb)")
        try:
            run_checked(
                [
                    self._bin("initdb"),
                    "-D",
                    str(self._data.resolve()),
                    "-U",
                    self._pg.user,
                    f"--pwfile={password_file.resolve()}",
                    "--auth-host=scram-sha-256",
                    "--auth-local=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                ],
                "postgres",
                os_user=self._os_user,
            )
        finally:
            password_file.unlink(missing_ok=True)
        self._marker.write_text("ok\n")

    def launch(self) -> Launch:
        return Launch(
            argv=[
                self._bin("postgres"),
                "-D",
                str(self._data.resolve()),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={(self._dir / 'run').resolve()}",
                "-c",
                "max_connections=300",
            ],
            os_user=self._os_user,
        )

    def _psql_env(self) -> dict[str, str]:
        return {"PGPASSWORD": self._pg.password.get_secret_value(), "PGCONNECT_TIMEOUT": "5"}

    def healthy(self) -> bool:
        probe = subprocess.run(
            [self._bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
            check=False,
            timeout=30,
        )
        return probe.returncode == 0

    def after_start(self, report: Report) -> None:
        common = ["-h", "127.0.0.1", "-p", str(self.port), "-U", self._pg.user]
        listing = run_checked(
            [self._bin("psql"), *common, "-d", "postgres", "-lqtA", "-F", "|"],
            "postgres",
            env=self._psql_env(),
        )
        names = {line.split("|", 1)[0] for line in listing.splitlines()}
        if self._pg.database not in names:
            report(f"creating database '{self._pg.database}'")
            run_checked(
                [self._bin("createdb"), *common, self._pg.database],
                "postgres",
                env=self._psql_env(),
            )
