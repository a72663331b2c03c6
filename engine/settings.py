"""The engine's configuration: the one place connection details live.

Settings are read once, at an entry point (the CLI, a test's conftest, a user's
own ``main``), and passed down as typed sub-objects. Nothing below the entry
point reads ``os.environ``.

Every field can be set from the environment with the ``ENGINE_`` prefix and a
double underscore between the section and the field, for example
``ENGINE_POSTGRES__PORT=5432`` or ``ENGINE_KAFKA__BOOTSTRAP_SERVERS=kafka:9092``.
The defaults point at the native local stack (``./dev up``), whose ports are
chosen away from the services' usual ones so that a system Postgres or Redis
on the same machine does not collide with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "ENGINE_"
ENV_NESTED_DELIMITER = "__"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PostgresSettings(_Section):
    """The write side's connection: the write model, the outbox, and the views the daemon writes."""

    host: str = "127.0.0.1"
    port: int = Field(default=54329, ge=1, le=65535)
    user: str = "engine"
    password: SecretStr = SecretStr("engine")
    database: str = "engine"
    pool_min_size: int = Field(default=1, ge=0)
    pool_max_size: int = Field(default=10, ge=1)
    command_timeout_s: float = Field(default=30.0, gt=0)

    def dsn(self) -> str:
        """A libpq URL for asyncpg; the password is quoted, never logged."""
        secret = quote(self.password.get_secret_value(), safe="")
        user = quote(self.user, safe="")
        return f"postgresql://{user}:{secret}@{self.host}:{self.port}/{self.database}"


class ReadPostgresSettings(_Section):
    """The query side's connection to the read model (the views): a read-only role.

    Host, port and database default to the write side's (one local server,
    two roles); point them at another database or a replica fed from the
    primary to separate the read model. The role gets SELECT only, so a write
    attempted through it fails.
    """

    host: str | None = None  # unset: ENGINE_POSTGRES__HOST
    port: int | None = Field(default=None, ge=1, le=65535)  # unset: ENGINE_POSTGRES__PORT
    database: str | None = None  # unset: ENGINE_POSTGRES__DATABASE
    user: str = "engine_reader"
    password: SecretStr = SecretStr("engine_reader")
    pool_min_size: int = Field(default=1, ge=0)
    pool_max_size: int = Field(default=10, ge=1)
    command_timeout_s: float = Field(default=10.0, gt=0)

    def resolve(self, write: PostgresSettings) -> PostgresSettings:
        """Connection settings for the read side, filling what is unset from the write side."""
        return PostgresSettings(
            host=self.host or write.host,
            port=self.port or write.port,
            database=self.database or write.database,
            user=self.user,
            password=self.password,
            pool_min_size=self.pool_min_size,
            pool_max_size=self.pool_max_size,
            command_timeout_s=self.command_timeout_s,
        )


class RedisSettings(_Section):
    """The quick-lookup store."""

    host: str = "127.0.0.1"
    port: int = Field(default=63790, ge=1, le=65535)
    db: int = Field(default=0, ge=0)
    # Every key the engine writes starts with this, so one Redis can serve several engines.
    key_prefix: str = "engine:"

    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.db}"


class KafkaSettings(_Section):
    """The event bus between the outbox relay and the projection daemon."""

    bootstrap_servers: str = "127.0.0.1:19092"
    topic: str = "orders.events"
    partitions: int = Field(default=6, ge=1, le=1000)
    replication_factor: int = Field(default=1, ge=1)
    request_timeout_s: float = Field(default=30.0, gt=0)

    def first_host_port(self) -> tuple[str, int]:
        """Host and port of the first bootstrap server (the one the local stack runs)."""
        first = self.bootstrap_servers.split(",")[0].strip()
        host, _, port = first.rpartition(":")
        return host or "127.0.0.1", int(port)


class ElasticsearchSettings(_Section):
    """The search store."""

    url: str = "http://127.0.0.1:19200"
    index_prefix: str = "engine"
    request_timeout_s: float = Field(default=30.0, gt=0)
    # When a document the daemon wrote becomes searchable (engine.stores.refresh):
    # "interval": the index refreshes on its own every refresh_interval; cheapest
    #   under heavy write load, but a write waits up to a whole interval.
    # "after_write": the daemon asks for a refresh right after each bulk it wrote,
    #   at most one in flight and one per refresh_min_gap_ms: searchable about one
    #   batch plus one refresh after the event at moderate rates, bounded cost under load.
    # See the README, "Elasticsearch visibility", for the measured trade-off.
    refresh: Literal["interval", "after_write"] = "after_write"
    # The index's own refresh_interval, under both policies (a backstop for
    # after_write, whose failed refreshes are only logged). Read when an index is
    # created: an existing index keeps the one it was created with.
    refresh_interval: str = Field(default="1s", pattern=r"^(-1|\d+(ms|s|m))$")
    # after_write: the least time between the starts of two refreshes of the index.
    refresh_min_gap_ms: int = Field(default=100, ge=0, le=60_000)

    def refresh_after_write_s(self) -> float | None:
        """The after_write policy's gap in seconds; ``None`` when the index refreshes on its own."""
        return self.refresh_min_gap_ms / 1000 if self.refresh == "after_write" else None

    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or "127.0.0.1", parts.port or 9200


class RelaySettings(_Section):
    """The outbox relay (``engine relay``)."""

    batch_size: int = Field(default=500, ge=1, le=10_000)
    # LISTEN/NOTIFY wakes the relay at once; this poll is the fallback if a
    # notification is lost (e.g. the listening connection was down).
    poll_interval_s: float = Field(default=1.0, gt=0)
    # Published outbox rows are deleted after this long; the event log keeps history.
    retention_hours: float = Field(default=24.0, ge=0)
    cleanup_interval_s: float = Field(default=60.0, gt=0)
    backoff_initial_s: float = Field(default=0.2, gt=0)
    backoff_max_s: float = Field(default=10.0, gt=0)
    # A standby relay retries taking the leader lock this often.
    standby_retry_s: float = Field(default=1.0, gt=0)
    leader_timeout_s: float = Field(
        default=10.0,
        ge=1.0,
        le=600.0,
        description=(
            "Longest a leader relay may go without renewing its lease. A standby that finds"
            " the lease older than this terminates the leader's Postgres session (a frozen"
            " process, a half-open connection) and takes over: publishing resumes within"
            " about leader_timeout_s + standby_retry_s of the leader going silent. The"
            " leader renews every quarter of it, and gives up leading itself if it cannot."
        ),
    )
    # At start-up, how long the relay waits for PostgreSQL and Kafka to answer (a
    # warning per attempt) before it exits with code 4; 0 waits for ever. A refused
    # login, a missing database or a schema not migrated stop it at once.
    startup_timeout_s: float = Field(default=300.0, ge=0)
    # The relay is stalled when events wait in the outbox and it has published nothing
    # for this long (see engine.health): readiness fails and `engine status` exits 1.
    stalled_after_s: float = Field(default=30.0, gt=0)
    # Where `engine relay` serves /metrics, /health/live and /health/ready (host: ops.host);
    # unset, it serves none (`engine up` sets one).
    metrics_port: int | None = Field(default=None, ge=0, le=65535)


class RunnerSettings(_Section):
    """The projection daemon (``engine run``)."""

    group_id: str = "engine-projections"
    # A batch closes at batch_size events or after max_latency_ms, whichever comes first.
    # Memory grows with it (see lane_queue_batches); a lane behind applies several at once.
    batch_size: int = Field(default=1000, ge=1, le=50_000)
    max_latency_ms: int = Field(default=100, ge=1, le=60_000)
    # Batches a projection's queue holds ahead of its store: the dispatcher waits (back-
    # pressure) when one is full. Memory: about 7 KB per decoded orders event in flight,
    # at most some (lane_queue_batches + 2) x batch_size events plus a lane's
    # max_apply_events (1 x 1,000 and 2,000: some 30 MB at the defaults).
    lane_queue_batches: int = Field(default=1, ge=1, le=10_000)
    # A lane that fell behind applies the batches waiting in its queue as one, up to
    # this many events: one fence, transaction and progress record for all of them.
    max_apply_events: int = Field(default=2_000, ge=1, le=100_000)
    # A lane whose queue stays full this long (slow, not failing) is detached too.
    slow_lane_timeout_s: float = Field(default=30.0, gt=0)
    # A lane whose store has not answered one call for this long (hung, not busy) is
    # detached as soon as its queue is full: the longest a store that stops answering
    # holds the other projections back. Keep it above the store's slowest normal batch.
    stall_timeout_s: float = Field(default=3.0, gt=0)
    # A handler that keeps failing (not a store outage) this many times is dead-lettered.
    max_attempts: int = Field(default=3, ge=1, le=100)
    # Aggregates whose last version the daemon remembers, to see a version jump (a gap)
    # in the stream; about 250 bytes each (100,000: some 25 MB). 0 turns the check off.
    gap_memory_aggregates: int = Field(default=100_000, ge=0, le=10_000_000)
    # While Postgres is unreachable, a lane whose own store answers keeps applying,
    # unconfirmed, up to this many events (kept in memory to apply again if a rebuild
    # switched generations meanwhile); past it, the lane waits for Postgres too.
    unconfirmed_max_events: int = Field(default=20_000, ge=0, le=1_000_000)
    # Documents each Redis and Elasticsearch store keeps of what it last wrote, so a
    # batch need not read them back first (engine.stores.cache); about 1 KB each for
    # the orders projections (10,000: some 10 MB per store). 0 turns the cache off.
    document_cache_size: int = Field(default=10_000, ge=0, le=10_000_000)
    # Bytes the Kafka consumer fetches ahead per partition (Kafka's
    # max.partition.fetch.bytes): at most this times the partitions a consumer holds
    # is buffered, for the group's consumer and for each lane catching up alone.
    fetch_partition_bytes: int = Field(default=512 * 1024, ge=64 * 1024, le=64 * 1024 * 1024)
    backoff_initial_s: float = Field(default=0.2, gt=0)
    backoff_max_s: float = Field(default=10.0, gt=0)
    shutdown_timeout_s: float = Field(default=20.0, gt=0)
    # How long the group waits for a daemon that stopped heartbeating (killed, frozen)
    # before giving its partitions to the others; heartbeats go every third of it.
    session_timeout_s: float = Field(default=10.0, ge=6.0, le=300.0)
    # How often the daemon records each lane's state for `engine status`; a daemon
    # silent for three times this long is taken for dead (killed or hung).
    state_interval_s: float = Field(default=2.0, gt=0, le=600)
    # A projection is stalled when events have waited this long and its progress on
    # their partition has not moved for as long, or when a lane has stayed detached
    # this long: `engine status` exits 1, readiness fails, engine_projection_stalled is 1.
    stalled_after_s: float = Field(default=30.0, gt=0)
    # Where `engine run` serves /metrics, /health/live and /health/ready (host: ops.host);
    # with several workers the supervisor serves them for all. Unset: none (`engine up`
    # sets one).
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    # At start-up, how long the daemon waits for PostgreSQL and Kafka to answer (a
    # warning per attempt) before it exits with code 4; 0 waits for ever. A refused
    # login, a missing database or a schema not migrated stop it at once.
    startup_timeout_s: float = Field(default=300.0, ge=0)
    workers: int = Field(
        default=0,
        ge=0,
        le=1024,
        description=(
            "Consumer processes `engine run` starts in the one consumer group, under a"
            " supervisor that restarts any that dies (engine/supervisor.py). 0 (the default)"
            " means one per core (os.cpu_count()), at most one per partition"
            " (kafka.partitions): a worker with no partition only holds connections."
            " 1 runs the daemon in the `engine run` process itself, with no supervisor. A"
            " number set is taken as it is. The `--workers` option of `engine run` wins."
        ),
    )


class ApiSettings(_Section):
    """The HTTP API (``engine api``)."""

    host: str = "127.0.0.1"
    port: int = Field(default=18080, ge=1, le=65535)
    # API keys, off when unset. With a writer key set, commands need it (header
    # X-API-Key); with a reader key set, queries need the reader or the writer key.
    writer_key: SecretStr | None = None
    reader_key: SecretStr | None = None
    # Longest a query carrying a consistency token waits for its projection.
    consistency_timeout_s: float = Field(default=5.0, gt=0, le=60)
    # Requests with a larger body are refused with 413 before they are parsed.
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # Server processes sharing the listening socket (``engine api --workers``); 0 means
    # one per core. One process serves on one core at most.
    workers: int = Field(default=1, ge=0, le=64)
    # On SIGTERM, how long requests in flight get to finish before connections close.
    graceful_shutdown_s: float = Field(default=10.0, gt=0, le=300)


class OpsSettings(_Section):
    """What operators watch: metrics and health endpoints, the status sample, the logs."""

    # The interface the daemon's and the relay's metrics ports listen on (the API's
    # /metrics is on its own port). 0.0.0.0 in a container, for Prometheus.
    host: str = "127.0.0.1"
    # Health, the status metrics and the live page read a status sample taken this often
    # in the background (one collect: a few Postgres queries and Kafka offset requests).
    status_interval_s: float = Field(default=5.0, gt=0, le=600)
    # A sample that takes longer is abandoned and reported as failed.
    status_timeout_s: float = Field(default=10.0, gt=0, le=600)
    # Log lines: "json" (one object per line), "text" (for people), "auto": text on a
    # terminal, JSON otherwise.
    log_format: Literal["auto", "json", "text"] = "auto"


class StackSettings(_Section):
    """The native local stack (``engine stack``): where it keeps its data and how big it is.

    Only the stack manager reads these; the engine itself never does.
    """

    data_dir: Path = Path(".stack")
    kafka_controller_port: int = Field(default=19093, ge=1, le=65535)
    elasticsearch_transport_port: int = Field(default=19300, ge=1, le=65535)
    kafka_heap: str = "512m"
    elasticsearch_heap: str = "512m"
    # Postgres and Elasticsearch refuse to run as root; these system users run them.
    postgres_os_user: str = "postgres"
    elasticsearch_os_user: str = "engine-es"
    start_timeout_s: float = Field(default=180.0, gt=0)
    stop_timeout_s: float = Field(default=30.0, gt=0)


class Settings(BaseSettings):
    """Everything the engine needs to know, built once at the entry point."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="ignore",
        frozen=True,
    )

    # The domain this process serves: "package.module:NAME" of an engine.Application.
    app: str = "projections.orders:APP"
    postgres: PostgresSettings = PostgresSettings()
    read: ReadPostgresSettings = ReadPostgresSettings()
    redis: RedisSettings = RedisSettings()
    kafka: KafkaSettings = KafkaSettings()
    elasticsearch: ElasticsearchSettings = ElasticsearchSettings()
    relay: RelaySettings = RelaySettings()
    runner: RunnerSettings = RunnerSettings()
    api: ApiSettings = ApiSettings()
    ops: OpsSettings = OpsSettings()
    stack: StackSettings = StackSettings()


def env_var(section: str, field: str) -> str:
    """The environment variable that sets ``section.field``, for error messages."""
    return f"{ENV_PREFIX}{section.upper()}{ENV_NESTED_DELIMITER}{field.upper()}"
