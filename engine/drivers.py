"""The one seam where driver errors become engine errors.

Each driver (asyncpg, redis, elasticsearch, aiokafka) has a context manager
here that wraps the calls made through it and re-raises what the driver
raised as an :mod:`engine.errors` error, ``from`` the driver's exception, in
the manner of httpx's ``map_httpcore_exceptions``. It works around awaits
(``with postgres_errors(address): await ...``). Each also has a function
returning the translation (or None), for a boundary that only sees the
exception afterwards, such as the HTTP API's exception handlers.

A :class:`ServiceUnavailableError` always names the service and its address
(``host:port``, with the setting that moves it when the caller knows it, see
the ``*_address`` functions); its hint is the caller's (what to do, e.g.
start the local stack) or else the driver's own text. Which driver errors
become which engine error, and why:

==============  =============================================  =========================
driver          raised by the driver                           becomes
==============  =============================================  =========================
PostgreSQL      OSError, TimeoutError, InterfaceError,         ServiceUnavailableError
                PostgresConnectionError (a connection lost
                mid-query), CannotConnectNow, AdminShutdown,
                CrashShutdown, InternalClientError (a pooled
                connection broken by a server restart)
PostgreSQL      Serialization, DeadlockDetected,               TransientError
                TooManyConnections, QueryCanceled
PostgreSQL      UndefinedTable                                 SchemaMissingError
Redis           ConnectionError (incl. BusyLoading),           ServiceUnavailableError
                TimeoutError
Redis           any other RedisError (READONLY, OOM, BUSY...)  TransientError
Elasticsearch   TransportError (connection, timeout, TLS,      ServiceUnavailableError
                an unreadable answer)
Elasticsearch   ApiError with status 429 or >= 500             TransientError
Kafka           KafkaConnectionError, NodeNotReady,            ServiceUnavailableError
                NoBrokersAvailable, KafkaTimeoutError,
                RequestTimedOut, TimeoutError, OSError
Kafka           any other KafkaError                           TransientError
==============  =============================================  =========================

Why this split: an outage or a service's own temporary refusal is not the
caller's fault, so it is a :class:`TransientError`, which a projection lane
waits out for as long as it takes and never dead-letters. Everything else
passes through untouched, because only the caller knows what it means: a
unique violation is a concurrent command (:mod:`engine.commands`), an
Elasticsearch 404 a missing index, a 400 a document the store rejects (the
projection's failure, counted by the lane), a refused login the role the
caller named. A missing table is translated because every caller means the
same by it: the schema has not been set up yet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from urllib.parse import urlsplit

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions
from aiokafka import errors as kafka
from elasticsearch import ApiError, AsyncElasticsearch, TransportError

from engine.errors import EngineError, SchemaMissingError, ServiceUnavailableError, TransientError
from engine.settings import (
    ElasticsearchSettings,
    KafkaSettings,
    PostgresSettings,
    RedisSettings,
    env_var,
)

START_HINT = "Start the local stack with: ./dev up"

POSTGRES_UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    # A pooled connection that got the server's shutdown notice while idle fails its
    # next use with "cannot switch to state N; another operation is in progress"
    # (asyncpg issue 784): the connection is lost, like the others here.
    asyncpg.InternalClientError,
)
POSTGRES_TRANSIENT = (
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.TooManyConnectionsError,
    asyncpg.QueryCanceledError,
)
# What :func:`postgres_error` translates: handlers that see raw errors register these.
POSTGRES_ERRORS = (
    *POSTGRES_UNREACHABLE,
    *POSTGRES_TRANSIENT,
    asyncpg.UndefinedTableError,
)

REDIS_UNREACHABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)
REDIS_ERRORS = (redis.exceptions.RedisError,)

KAFKA_UNREACHABLE = (
    kafka.KafkaConnectionError,
    kafka.NodeNotReadyError,
    kafka.NoBrokersAvailable,
    kafka.KafkaTimeoutError,
    kafka.RequestTimedOutError,
    TimeoutError,
    OSError,
)

Translate = Callable[[BaseException, str, "str | None"], "EngineError | None"]


def _unavailable(
    service: str, exc: BaseException, address: str, hint: str | None
) -> ServiceUnavailableError:
    return ServiceUnavailableError(service, address, hint or _text(exc))


def _transient(service: str, exc: BaseException, address: str) -> TransientError:
    # No hint: it says what to do about an outage, and the service is up.
    return TransientError(f"{service} at {address}: {_text(exc)}")


def _text(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- translations -------------------------------------------------------------------


def postgres_error(exc: BaseException, address: str, hint: str | None = None) -> EngineError | None:
    """The engine error for an asyncpg failure (module table), or None to let it pass."""
    if isinstance(exc, POSTGRES_UNREACHABLE):
        return _unavailable("PostgreSQL", exc, address, hint)
    if isinstance(exc, POSTGRES_TRANSIENT):
        return _transient("PostgreSQL", exc, address)
    if isinstance(exc, asyncpg.UndefinedTableError):
        return SchemaMissingError(f"PostgreSQL at {address}: {exc}")
    return None


def redis_error(exc: BaseException, address: str, hint: str | None = None) -> EngineError | None:
    """The engine error for a redis failure (module table), or None to let it pass."""
    if isinstance(exc, REDIS_UNREACHABLE):
        return _unavailable("Redis", exc, address, hint)
    if isinstance(exc, redis.exceptions.RedisError):
        return _transient("Redis", exc, address)
    return None


def elasticsearch_error(
    exc: BaseException, address: str, hint: str | None = None
) -> EngineError | None:
    """The engine error for an elasticsearch failure (module table), or None to let it pass."""
    if isinstance(exc, TransportError):
        return _unavailable("Elasticsearch", exc, address, hint)
    if isinstance(exc, ApiError) and (exc.meta.status >= 500 or exc.meta.status == 429):
        return _transient("Elasticsearch", exc, address)
    return None


def kafka_error(exc: BaseException, address: str, hint: str | None = None) -> EngineError | None:
    """The engine error for an aiokafka failure (module table), or None to let it pass."""
    if isinstance(exc, KAFKA_UNREACHABLE):
        return _unavailable("Kafka", exc, address, hint)
    if isinstance(exc, kafka.KafkaError):
        return _transient("Kafka", exc, address)
    return None


# -- the seams ----------------------------------------------------------------------


@contextmanager
def _translating(translate: Translate, address: str, hint: str | None) -> Iterator[None]:
    try:
        yield
    except Exception as exc:  # CancelledError is a BaseException: it always passes
        translated = translate(exc, address, hint)
        if translated is None:
            raise
        raise translated from exc


def postgres_errors(address: str, hint: str | None = None) -> AbstractContextManager[None]:
    """Translate asyncpg failures of the wrapped calls; ``address`` is the server's."""
    return _translating(postgres_error, address, hint)


def redis_errors(address: str, hint: str | None = None) -> AbstractContextManager[None]:
    """Translate redis failures of the wrapped calls; ``address`` is the server's."""
    return _translating(redis_error, address, hint)


def elasticsearch_errors(address: str, hint: str | None = None) -> AbstractContextManager[None]:
    """Translate elasticsearch failures of the wrapped calls; ``address`` is the cluster's."""
    return _translating(elasticsearch_error, address, hint)


def kafka_errors(address: str, hint: str | None = None) -> AbstractContextManager[None]:
    """Translate aiokafka failures of the wrapped calls; ``address`` is the bootstrap servers."""
    return _translating(kafka_error, address, hint)


# -- addresses ----------------------------------------------------------------------
# From settings: host:port and the setting that moves it. From a client: host:port.


def postgres_address(source: PostgresSettings | asyncpg.Pool) -> str:
    if isinstance(source, PostgresSettings):
        return f"{source.host}:{source.port} ({env_var('postgres', 'port')})"
    # asyncpg keeps no public record of where a pool connects: its connect
    # arguments (the DSN engine.postgres.pool passes) are the only place.
    args = getattr(source, "_connect_args", None) or ()
    kwargs = getattr(source, "_connect_kwargs", None) or {}
    dsn = args[0] if args else kwargs.get("dsn")
    host, port = kwargs.get("host"), kwargs.get("port")
    if isinstance(dsn, str):
        parts = urlsplit(dsn)
        host = host or parts.hostname
        try:
            port = port or parts.port
        except ValueError:  # a DSN listing several hosts
            host, port = host or parts.netloc.rpartition("@")[2], None
    return f"{host or 'localhost'}:{port or 5432}"


def redis_address(source: RedisSettings | aioredis.Redis) -> str:
    if isinstance(source, RedisSettings):
        return f"{source.host}:{source.port} ({env_var('redis', 'port')})"
    kwargs = source.connection_pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])  # a Unix socket
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def elasticsearch_address(source: ElasticsearchSettings | AsyncElasticsearch) -> str:
    if isinstance(source, ElasticsearchSettings):
        host, port = source.host_port()
        return f"{host}:{port} ({env_var('elasticsearch', 'url')})"
    nodes = source.transport.node_pool.all()
    return ", ".join(f"{node.config.host}:{node.config.port}" for node in nodes) or "(no node)"


def kafka_address(settings: KafkaSettings) -> str:
    return f"{settings.bootstrap_servers} ({env_var('kafka', 'bootstrap_servers')})"
