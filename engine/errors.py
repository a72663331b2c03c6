"""Every error the engine raises, grouped by how a caller reacts to it.

::

    EngineError                      root: catch this to catch everything of ours
    ├── TransientError               retry it (with backoff): the store or broker is down or slow
    │   ├── ServiceUnavailableError  a service cannot be reached at all
    │   ├── ConflictError            someone else changed the aggregate first: reload and retry
    │   └── NotYetConsistentError    a projection has not applied a token's write yet
    ├── InvalidInputError            fix the input: the request itself is wrong
    │   ├── ValidationFailedError    a field is malformed (names the field)
    │   ├── NotFoundError            the aggregate named does not exist
    │   ├── RuleViolationError       a business rule forbids it (e.g. an invalid transition)
    │   └── CommandIdReusedError     a command id was sent again with different content
    ├── WriteNotAppliedError         an operator must act: a projection dead-lettered the write
    ├── RebuildInProgressError       wait or stop it: the projection is being rebuilt elsewhere
    ├── PoisonError                  dead-letter it: this event will never apply
    │   ├── UnknownEventError        no model is registered for the event's type and version
    │   ├── EventDecodeError         the bytes or the payload do not decode
    │   └── VersionGapError          the versions before it are missing from the topic
    └── ConfigurationError           stop and say what to set
        ├── SchemaMissingError       a table the engine needs does not exist yet (migrate, run)
        ├── MissingToolError         a program the local stack needs is not installed
        ├── PortInUseError           another process holds a port the stack wants
        └── StackError               a local-stack service failed to install or start

Errors of the drivers underneath (asyncpg, aiokafka, redis, elasticsearch) are
translated into these at one seam, :mod:`engine.drivers` (one context manager
per driver, with the table of what becomes what), with ``raise ... from exc``,
so that callers never need to import a driver to handle a failure.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime


class EngineError(Exception):
    """Root of every error the engine raises."""


class TransientError(EngineError):
    """A temporary failure: the same call may succeed if retried later."""


class ServiceUnavailableError(TransientError):
    """A service (Postgres, Redis, Kafka, Elasticsearch) cannot be reached."""

    def __init__(self, service: str, address: str, hint: str = "") -> None:
        self.service = service
        self.address = address
        self.hint = hint
        message = f"{service} is not reachable at {address}"
        super().__init__(f"{message}. {hint}" if hint else message)


class ConflictError(TransientError):
    """Optimistic concurrency: the aggregate changed since it was read."""

    def __init__(self, detail: str, aggregate_id: str | None = None) -> None:
        self.aggregate_id = aggregate_id
        super().__init__(detail)


class NotYetConsistentError(TransientError):
    """A read asked for read-your-writes and its projection has not caught up in time.

    Answering with the stale state would present old data as fresh, so the
    caller gets this instead and may retry.
    """

    def __init__(self, projection: str, token: str, waited_s: float) -> None:
        self.projection = projection
        self.token = token
        self.waited_s = waited_s
        super().__init__(
            f"the projection {projection!r} has not applied the write of consistency token "
            f"{token} yet (waited {waited_s:.1f}s); retry shortly"
        )


class WriteNotAppliedError(EngineError):
    """A read asked for read-your-writes and the projection dead-lettered that write.

    Waiting cannot help (the projection moved past it), and answering would
    present a read model without the write as if it had it; the write shows
    once the cause is fixed and the dead letter replayed (``engine dlq``).
    """

    def __init__(self, projection: str, token: str, letter_id: int) -> None:
        self.projection = projection
        self.token = token
        self.letter_id = letter_id
        super().__init__(
            f"the projection {projection!r} could not apply the write of consistency token "
            f"{token} (or an earlier event of the same aggregate): dead letter {letter_id}; "
            "it shows once the dead letter is replayed (engine dlq replay)"
        )


class RebuildInProgressError(EngineError):
    """Another session is rebuilding the same projection; names who, where and since when.

    Not retried by itself: an operator decides whether to wait for that
    rebuild or to stop it (``pid`` is its Postgres backend).
    """

    def __init__(
        self,
        projection: str,
        pid: int | None,
        application_name: str,
        host: str,
        since: datetime | None,
    ) -> None:
        self.projection = projection
        self.pid = pid
        self.application_name = application_name
        self.host = host
        self.since = since
        if pid is None:
            super().__init__(f"{projection} was being rebuilt by {application_name}; try again")
            return
        started = f" since {since:%Y-%m-%d %H:%M:%S %Z}" if since is not None else ""
        super().__init__(
            f"{projection} is already being rebuilt by {application_name!r} (Postgres backend "
            f"pid {pid}, from {host}{started}); wait for it to finish, or stop it "
            f"(SELECT pg_terminate_backend({pid}) ends its session and releases the lock)"
        )


class InvalidInputError(EngineError):
    """The caller sent something that can never succeed as it is."""


class ValidationFailedError(InvalidInputError):
    """A field of a command is malformed; ``field`` names it (dotted path)."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class NotFoundError(InvalidInputError):
    """The aggregate a command or query names does not exist."""

    def __init__(self, aggregate: str, aggregate_id: str) -> None:
        self.aggregate = aggregate
        self.aggregate_id = aggregate_id
        super().__init__(f"{aggregate} {aggregate_id} does not exist")


class RuleViolationError(InvalidInputError):
    """A business rule forbids the command in the aggregate's current state.

    ``details`` carries what a client needs to understand it (for a refused
    transition: the current and the requested state); the HTTP API returns it.
    """

    def __init__(self, message: str, details: Mapping[str, str] | None = None) -> None:
        self.details = dict(details or {})
        super().__init__(message)


class CommandIdReusedError(InvalidInputError):
    """The same command id arrived with different content: a client bug, not a retry."""


class PoisonError(EngineError):
    """An event that cannot be decoded or applied; it belongs in the dead-letter store."""


class UnknownEventError(PoisonError):
    """No model is registered for this event type and schema version."""


class EventDecodeError(PoisonError):
    """An event's bytes or payload do not decode into its model."""


class VersionGapError(PoisonError):
    """An event's aggregate version jumped: the versions before it are missing (engine.gaps)."""

    def __init__(self, aggregate_id: str, version: int, expected: int) -> None:
        self.aggregate_id = aggregate_id
        self.version = version
        self.expected = expected
        missing = (
            f"version {expected}"
            if expected == version - 1
            else (f"versions {expected} to {version - 1}")
        )
        super().__init__(
            f"{aggregate_id} version {version} arrived right after version {expected - 1}:"
            f" {missing} missing from the topic; its later events are parked behind this one"
        )


class ConfigurationError(EngineError):
    """The engine or its local stack is set up wrongly; the message says what to change."""


class SchemaMissingError(ConfigurationError):
    """A table or view the engine needs does not exist: the schema is not set up yet."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(
            f"the database schema is missing ({detail}); create it with: engine migrate "
            "(a projection's own tables and views are created by the projection daemon: "
            "engine run)"
        )


class MissingToolError(ConfigurationError):
    """A program the local stack needs (java, mvn, apt-get...) is not installed."""

    def __init__(self, tool: str, why: str, how: str) -> None:
        self.tool = tool
        super().__init__(f"'{tool}' is required {why} but was not found. {how}")


class PortInUseError(ConfigurationError):
    """A port the local stack wants is held by a process the stack did not start."""

    def __init__(self, service: str, port: int, setting: str) -> None:
        self.service = service
        self.port = port
        self.setting = setting
        super().__init__(
            f"{service}: port {port} on 127.0.0.1 is already in use by another process. "
            f"Stop that process, or choose another port with {setting}=<port>."
        )


class StackError(ConfigurationError):
    """A local-stack service failed to install or start; carries the tail of its log."""

    def __init__(self, service: str, problem: str, log_tail: str = "") -> None:
        self.service = service
        self.problem = problem
        self.log_tail = log_tail
        text = f"{service}: {problem}"
        if log_tail:
            text += f"\n--- last lines of the {service} log ---\n{log_tail}"
        super().__init__(text)
