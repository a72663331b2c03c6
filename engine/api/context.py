"""What the API's endpoints reach: the command bus, the read side and the consistency gate."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import asyncpg
from fastapi import Header, Query, Request

from engine.api.openapi import token_regex
from engine.application import Application
from engine.commands import CommandBus, CommandResult
from engine.consistency import ConsistencyGate, ConsistencyToken
from engine.errors import ConfigurationError, ValidationFailedError
from engine.health import StatusSampler
from engine.postgres.pool import create_pool
from engine.resources import Resources, open_resources
from engine.settings import Settings, env_var
from engine.status import collect_status

T = TypeVar("T")


@dataclass(frozen=True)
class ApiContext:
    """Opened once per API process (FastAPI lifespan), shared by every request."""

    settings: Settings
    application: Application
    bus: CommandBus
    # The read side: ``pool`` here is the read-only role's pool.
    reads: Resources
    gate: ConsistencyGate
    # The engine's status, sampled in the background for the process's life: what
    # /health/ready judges and what GET /status answers while it is fresh.
    sampler: StatusSampler
    # What an application builds once from the context (its query objects): see memo.
    _memo: dict[Callable[[ApiContext], Any], Any] = field(
        default_factory=dict, compare=False, repr=False
    )

    def memo(self, build: Callable[[ApiContext], T]) -> T:
        """``build(self)``, made on the first call and kept for this process's life.

        For the objects an application's endpoints would otherwise build on every
        request from the same connections (query handlers, script registrations).
        """
        try:
            value: T = self._memo[build]
        except KeyError:
            value = self._memo[build] = build(self)
        return value

    def token_for(self, result: CommandResult) -> str | None:
        token = ConsistencyToken.of(result, self.settings.kafka.partitions)
        return token.encode() if token else None


@asynccontextmanager
async def open_api_context(
    settings: Settings, application: Application
) -> AsyncIterator[ApiContext]:
    write_pool = await create_pool(settings.postgres)
    try:
        async with (
            _open_reads(settings) as reads,
            _sampler(settings, application, reads).running() as s,
        ):
            yield ApiContext(
                settings=settings,
                application=application,
                bus=CommandBus(write_pool, application.handlers, settings.postgres),
                reads=reads,
                gate=ConsistencyGate(
                    reads.pool, settings.kafka.topic, settings.api.consistency_timeout_s
                ),
                sampler=s,
            )
    finally:
        await write_pool.close()


def _sampler(settings: Settings, application: Application, reads: Resources) -> StatusSampler:
    return StatusSampler(
        lambda: collect_status(settings, application, reads),
        interval_s=settings.ops.status_interval_s,
        timeout_s=settings.ops.status_timeout_s,
    )


@asynccontextmanager
async def _open_reads(settings: Settings) -> AsyncIterator[Resources]:
    """The stores as the query side sees them: Postgres through the read-only role."""
    read = settings.read.resolve(settings.postgres)
    async with AsyncExitStack() as stack:
        try:
            reads = await stack.enter_async_context(open_resources(settings, read))
        except (
            asyncpg.InvalidPasswordError,
            asyncpg.InvalidAuthorizationSpecificationError,
        ) as exc:
            raise ConfigurationError(
                f"the read-only role {read.user!r} cannot log in ({exc}); create it with "
                f"'engine migrate', or set {env_var('read', 'user')} and "
                f"{env_var('read', 'password')}"
            ) from exc
        yield reads


# The dependencies are ``async def`` on purpose: FastAPI runs a plain ``def``
# dependency in a worker thread, two thread hand-offs per request for what is
# a dictionary look-up (they showed in the API's profile).


async def api_context(request: Request) -> ApiContext:
    """FastAPI dependency: the process's context."""
    context: ApiContext = request.app.state.context
    return context


async def consistency_token(
    request: Request,
    consistency_token: Annotated[
        str | None,
        Query(
            description="Wait (bounded) until the projection read has applied the write that "
            "returned this token; 503 not_yet_consistent if it has not in time, "
            "503 write_dead_lettered if the projection dead-lettered it. Exactly as a command "
            "returned it: a token this API cannot have issued is refused with 422.",
            max_length=40,
        ),
    ] = None,
    x_consistency_token: Annotated[
        str | None, Header(description="The same as the query parameter.", max_length=40)
    ] = None,
) -> ConsistencyToken | None:
    """FastAPI dependency: the token from the query string or the header, parsed."""
    partitions: int = request.app.state.settings.kafka.partitions
    given = [text for text in (consistency_token, x_consistency_token) if text is not None]
    for text in given:
        # The document's pattern (engine.api.openapi): a partition beyond the configured
        # count, or a position beyond a bigint, was not issued here, and waiting for it
        # would only end in a timeout. Empty is not a token either.
        if token_regex(partitions).fullmatch(text) is None:
            raise ValidationFailedError(
                "consistency_token",
                "not a consistency token of this API (expected the value a command returned, "
                f"with a partition below {partitions})",
            )
    return ConsistencyToken.parse(given[0]) if given else None
