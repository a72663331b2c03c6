"""Profiling the daemon with pyinstrument, as a prefix to its command line.

``pyinstrument -r pyisession -o FILE -m engine run`` samples the real daemon
process; it writes the session when the daemon exits after SIGTERM, and the
session is rendered three times: the call tree as text (the summary to read),
a flat list by own time, and an HTML page to browse. The session itself is
deleted afterwards (hundreds of MB for a long run).

Sampling every 5 ms keeps the profiler's own cost down (every 1 ms halved the
daemon's throughput and took 2 GB); the profiled run's figures are still
slower than an unprofiled run's, so the results mark it ``profiled``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path


def available() -> bool:
    return importlib.util.find_spec("pyinstrument") is not None


def prefix(session: Path, interval_s: float = 0.005) -> list[str]:
    """The command line to put before ``-m engine ...`` to profile it into ``session``."""
    return [
        sys.executable,
        "-m",
        "pyinstrument",
        "--interval",
        str(interval_s),
        "-r",
        "pyisession",
        "-o",
        str(session),
    ]


async def _render(session: Path, out: Path, *options: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pyinstrument",
        "--load",
        str(session),
        *options,
        "-o",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await process.wait()


def _exists(path: Path) -> bool:
    return path.exists()


def _delete(path: Path) -> None:
    path.unlink(missing_ok=True)


def _lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.exists() else []


async def render(session: Path, top: int = 60) -> dict[str, object]:
    """Flat (own time) and tree text reports beside ``session``; the flat report's top lines."""
    if not _exists(session):
        return {"error": f"no profile was written ({session.name})"}
    flat = session.with_suffix(".flat.txt")
    tree = session.with_suffix(".tree.txt")
    page = session.with_suffix(".html")
    await _render(session, tree, "-r", "text")
    await _render(session, flat, "-r", "text", "-p", "flat=true")
    await _render(session, page, "-r", "html")
    _delete(session)
    return {
        "tree_report": tree.name,
        "flat_report": flat.name,
        "html_report": page.name,
        "tree_top": [line for line in _lines(tree) if line.strip()][:top],
        "flat_top": [line for line in _lines(flat) if line.strip()][:top],
    }
