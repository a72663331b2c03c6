"""What the API's endpoints reach: the command bus, the read side and the consistency gate."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

import asyncpg
from fastapi import Header, Query, Request

from engine.application import Application
from engine.commands import CommandBus, CommandResult
from engine.consistency import ConsistencyGate, ConsistencyToken
from engine.errors import ConfigurationError, ValidationFailedError
from engine.postgres.pool import create_pool
from engine.resources import Resources, open_resources
from engine.settings import Settings, env_var


@dataclass(frozen=True)
class ApiContext:
    """Opened once per API process (FastAPI lifespan), shared by every request."""

    settings: Settings
    application: Application
    bus: CommandBus
    # The read side: ``pool`` here is the read-only role's pool.
    reads: Resources
    gate: ConsistencyGate

    def token_for(self, result: CommandResult) -> str | None:
        token = ConsistencyToken.of(result, self.settings.kafka.partitions)
        return token.encode() if token else None


@asynccontextmanager
async def open_api_context(
    settings: Settings, application: Application
) -> AsyncIterator[ApiContext]:
    write_pool = await create_pool(settings.postgres)
    try:
        async with _open_reads(settings) as reads:
            yield ApiContext(
                settings=settings,
                application=application,
                bus=CommandBus(write_pool, application.handlers, settings.postgres),
                reads=reads,
                gate=ConsistencyGate(
                    reads.pool, settings.kafka.topic, settings.api.consistency_timeout_s
                ),
            )
    finally:
        await write_pool.close()


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


def api_context(request: Request) -> ApiContext:
    """FastAPI dependency: the process's context."""
    context: ApiContext = request.app.state.context
    return context


def consistency_token(
    request: Request,
    consistency_token: Annotated[
        str | None,
        Query(
            description="Wait (bounded) until the projection read has applied the write that "
            "returned this token; 503 not_yet_consistent if it has not in time, "
            "503 write_dead_lettered if the projection dead-lettered it.",
            max_length=40,
        ),
    ] = None,
    x_consistency_token: Annotated[
        str | None, Header(description="The same as the query parameter.", max_length=40)
    ] = None,
) -> ConsistencyToken | None:
    """FastAPI dependency: the token from the query string or the header, parsed."""
    text = consistency_token or x_consistency_token
    if not text:
        return None
    token = ConsistencyToken.parse(text)
    partitions: int = request.app.state.settings.kafka.partitions
    if token.partition >= partitions:
        # Not one we issued: waiting for it would only end in a timeout.
        raise ValidationFailedError(
            "consistency_token", f"names partition {token.partition} of {partitions}"
        )
    return token
