"""Logging for long-running commands: rich, timestamped, level from --log-level."""

from __future__ import annotations

import logging

from rich.logging import RichHandler


def configure(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(name)s: %(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
        force=True,
    )
    # aiokafka is chatty at INFO about every (re)connection attempt.
    quiet = max(logging.WARNING, logging.getLogger().level)
    logging.getLogger("aiokafka").setLevel(quiet)
    # The Elasticsearch transport logs every request at INFO.
    logging.getLogger("elastic_transport").setLevel(quiet)
