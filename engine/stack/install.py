"""Installing what the stack runs, from package registries only, idempotently.

Every download lands in a ``*.partial`` folder that is renamed into place only
when complete, so a run killed mid-download leaves a ``.partial`` folder (which
the next run removes and redoes) and never a half-filled final folder.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from engine.errors import ConfigurationError, MissingToolError, StackError
from engine.stack.process import identity_of
from engine.stack.versions import MIN_JAVA_MAJOR

Report = Callable[[str], None]

_APT_HOW = "Install it with your package manager (the stack uses Debian's packages)."


def require_tool(tool: str, why: str, how: str) -> str:
    """The path of ``tool`` on PATH, or a MissingToolError saying how to get it."""
    path = shutil.which(tool)
    if path is None:
        raise MissingToolError(tool, why, how)
    return path


def java_home(min_major: int = MIN_JAVA_MAJOR) -> Path:
    """JAVA_HOME of the ``java`` on PATH, checked to be at least ``min_major``."""
    java = require_tool(
        "java",
        "to run Kafka and Elasticsearch",
        f"Install a JDK {min_major} or newer (Debian: apt-get install openjdk-17-jre-headless).",
    )
    out = subprocess.run(
        [java, "-version"], capture_output=True, text=True, check=False, timeout=60
    )
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match is None:
        raise ConfigurationError(f"could not read the version of {java}: {out.stderr.strip()}")
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8" style
        major = int(match.group(2))
    if major < min_major:
        raise ConfigurationError(
            f"{java} is Java {major}; Kafka and Elasticsearch here need Java {min_major} or newer."
        )
    return Path(java).resolve().parent.parent


def run_checked(
    argv: Sequence[str],
    what: str,
    *,
    env: dict[str, str] | None = None,
    os_user: str | None = None,
) -> str:
    """Run a setup command; on failure raise a StackError naming ``what`` with its output."""
    user, group, extra_groups = identity_of(os_user)
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
        timeout=1800,
        user=user,
        group=group,
        extra_groups=extra_groups,
    )
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip().splitlines()
        raise StackError(
            what, f"'{' '.join(argv)}' exited with {proc.returncode}", "\n".join(output[-30:])
        )
    return str(proc.stdout)


def apt_install(packages: Sequence[str], report: Report) -> None:
    """Install Debian packages (as root), refreshing the package lists once if needed."""
    apt = require_tool("apt-get", "to install PostgreSQL and Redis", _APT_HOW)
    if os.geteuid() != 0:
        raise ConfigurationError(
            f"installing {', '.join(packages)} needs root: run "
            f"'sudo apt-get install -y {' '.join(packages)}' once, then run this again."
        )
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "-q", "--no-install-recommends", *packages]
    report(f"installing Debian packages: {', '.join(packages)}")
    try:
        run_checked(install, "apt-get", env=env)
    except StackError:
        # A fresh machine often has no package lists yet: fetch them once and retry.
        report("refreshing the Debian package lists (apt-get update)")
        run_checked([apt, "update", "-q"], "apt-get", env=env)
        run_checked(install, "apt-get", env=env)


def ensure_os_user(name: str, report: Report) -> None:
    """Create a system user (no login, no home) if missing: servers that refuse root run as it."""
    try:
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    if os.geteuid() != 0:
        raise ConfigurationError(
            f"the system user '{name}' is missing and only root can create it."
        )
    useradd = require_tool("useradd", "to create a service user", _APT_HOW)
    report(f"creating system user '{name}'")
    run_checked(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], "useradd"
    )


def chown_tree(path: Path, user: str) -> None:
    """Give ``path`` and everything below it to ``user`` (only when running as root)."""
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    for folder, dirs, files in os.walk(path):
        os.chown(folder, entry.pw_uid, entry.pw_gid)
        for name in (*dirs, *files):
            os.chown(os.path.join(folder, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def install_atomically(target: Path, fill: Callable[[Path], None]) -> bool:
    """Create ``target`` by filling a sibling ``.partial`` folder and renaming it.

    Returns False (and does nothing) if ``target`` already exists.
    """
    if target.exists():
        return False
    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by an interrupted run: redo it from scratch
    partial.mkdir(parents=True)
    fill(partial)
    partial.rename(target)
    return True


def maven(args: Sequence[str], what: str) -> None:
    mvn = require_tool(
        "mvn",
        "to fetch Kafka and Elasticsearch from Maven Central",
        "Install Apache Maven (Debian: apt-get install maven).",
    )
    run_checked([mvn, "-B", "-q", *args], what)


def unzip_with_modes(archive: Path, into: Path) -> None:
    """Extract a zip keeping the Unix file modes (``zipfile`` alone drops the exec bits)."""
    with zipfile.ZipFile(archive) as zipped:
        for info in zipped.infolist():
            extracted = Path(zipped.extract(info, into))
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                extracted.chmod(mode)
