"""Logging for long-running commands: for people on a terminal, JSON lines for machines.

``ENGINE_OPS__LOG_FORMAT`` chooses: ``text`` (rich, timestamped), ``json`` (one
object per line) or ``auto`` (the default): text when the output is a
terminal, JSON otherwise, since a daemon's output that is not a terminal is
read by a log shipper, not a person.

A JSON line has ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
``pid``, and every field of :data:`FIELDS` the call passed in ``extra`` (the
daemon names the projection, partition, offset and event of what it logs),
plus the correlation id bound in the context (:mod:`engine.correlation`).
A failure's traceback is in ``error``. So a line can be found by any of
them: ``jq 'select(.correlation_id == "...")'`` follows one command from
the API's request through the daemon.

The format is read from the environment here, not from the settings: logging
is set up first, so that a settings error can itself be logged.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
from rich.logging import RichHandler

from engine import correlation
from engine.settings import env_var

# The fields a log call may pass in ``extra`` that JSON lines carry (others are ignored:
# the record's own attributes are not ours to publish).
FIELDS = (
    "projection",
    "store",
    "partition",
    "offset",
    "event_id",
    "event_type",
    "aggregate_id",
    "aggregate_version",
    "correlation_id",
    "command",
    "command_id",
    "outcome",
    "worker",
    "route",
    "method",
    "status",
    "duration_ms",
)
FORMATS = ("auto", "json", "text")


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module's docstring for the fields)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        fields = record.__dict__
        for name in FIELDS:
            value = fields.get(name)
            if value is not None:
                line[name] = value
        if "correlation_id" not in line and (bound := correlation.current()) is not None:
            line["correlation_id"] = bound
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def log_format(stream: TextIO, chosen: str | None = None) -> str:
    """``json`` or ``text`` for this stream, from ``chosen`` or ENGINE_OPS__LOG_FORMAT."""
    name = env_var("ops", "log_format")
    wanted = (chosen or os.environ.get(name) or "auto").strip().lower()
    if wanted not in FORMATS:
        print(
            f"warning: {name}={wanted!r} is not one of {', '.join(FORMATS)}; using auto",
            file=sys.stderr,
        )
        wanted = "auto"
    if wanted == "auto":
        return "text" if stream.isatty() else "json"
    return wanted


def configure(level: str, *, stream: TextIO | None = None, fmt: str | None = None) -> None:
    """Set up the root logger at ``level``, as text or JSON lines (see the module's docstring)."""
    out = stream or sys.stdout
    handler: logging.Handler
    if log_format(out, fmt) == "json":
        handler = logging.StreamHandler(out)
        handler.setFormatter(JsonFormatter())
    else:
        handler = RichHandler(show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s", datefmt="[%X]"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # aiokafka is chatty at INFO about every (re)connection attempt.
    quiet = max(logging.WARNING, logging.getLogger().level)
    logging.getLogger("aiokafka").setLevel(quiet)
    # The Elasticsearch transport logs every request at INFO.
    logging.getLogger("elastic_transport").setLevel(quiet)
