"""Postgres projection stores: progress in the same transaction as the effect.

Both stores take a transaction-scoped advisory lock per (projection, aggregate)
before reading, in sorted order (no deadlocks), so two daemons that briefly
process the same partition during a rebalance serialize per aggregate instead
of folding from a stale base.

- :class:`PostgresDocumentStore`: one row per aggregate; the row's ``version``
  column is the progress record, and the upsert only replaces a row whose
  version is lower.
- :class:`PostgresSqlStore`: free-form SQL; progress is a row per
  (projection, aggregate) in ``engine_projection_versions``, read ``FOR
  UPDATE``-equivalent (advisory lock) and advanced in the same transaction.

Set-up is safe to run from several daemons at once. ``CREATE TABLE IF NOT
EXISTS`` is not: "if not exists" is checked against the catalogue before the
row is inserted, so two transactions creating the same table both pass the
check and the second fails on the catalogue's unique index
(``pg_type_typname_nsp_index``); ``CREATE VIEW`` after a look-up races the
same way. So each set-up transaction first takes a transaction-scoped advisory
lock per readers' view it serves (the name every generation shares), in sorted
order: set-ups of one projection run one after the other, and the second sees
the first's committed tables and view (catalogue look-ups do not use the
transaction's snapshot) and creates nothing. The lock is released at commit or
rollback, so a crashed daemon holds nothing; set-up is rare and short, so
serializing it costs nothing worth measuring.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
import orjson

from engine.drivers import postgres_address, postgres_errors
from engine.errors import ConfigurationError
from engine.postgres.migrations import Migration
from engine.postgres.pool import Connection
from engine.projection import Document, DocumentProjection, Projected, SqlProjection, fold

PROJECTION_MIGRATIONS = (
    Migration(
        "engine-0002-projection-progress",
        """
        CREATE TABLE engine_projection_versions (
            projection   text NOT NULL,
            aggregate_id text NOT NULL,
            version      integer NOT NULL,
            PRIMARY KEY (projection, aggregate_id)
        );
        """,
    ),
)

# A prefix of its own keeps these keys apart from the per-aggregate ones below.
_LOCK_SETUP = """
    SELECT pg_advisory_xact_lock(hashtextextended('engine-setup:' || v, 0))
    FROM unnest($1::text[]) AS v ORDER BY v
"""

_LOCK_KEYS = """
    SELECT pg_advisory_xact_lock(hashtextextended($1 || ':' || k, 0))
    FROM unnest($2::text[]) AS k ORDER BY k
"""


_JSON_TYPES = frozenset({"json", "jsonb"})


def _json_default(value: object) -> str:
    return str(value)  # Decimal and the like: their text form is what Postgres parses


class PostgresDocumentStore:
    """Rows (one per aggregate, keyed by ``key_column``) folded by a projection.

    Generation ``g`` lives in the table ``{name}_g{g}``; readers query the view
    ``{name}``, which a rebuild re-points in the same transaction that switches
    the generation.
    """

    # Readers live in Postgres: a rebuild moves them inside its switch transaction.
    publish_in_transaction = True

    def __init__(
        self,
        pool: asyncpg.Pool,
        projection: DocumentProjection,
        name: str,
        schema: str,
        *,
        key_column: str = "id",
        generation: int = 1,
    ) -> None:
        self._pool = pool
        self._projection = projection
        self.view = name
        self.generation = generation
        self.table = f"{name}_g{generation}"
        self._schema = schema
        self._key = key_column
        self._upsert: str | None = None
        self._json_columns: tuple[str, ...] = ()

    def at_generation(self, generation: int) -> PostgresDocumentStore:
        return PostgresDocumentStore(
            self._pool,
            self._projection,
            self.view,
            self._schema,
            key_column=self._key,
            generation=generation,
        )

    async def setup(self) -> None:
        """Create this generation's table; create the readers' view if there is none yet."""
        async with self._pool.acquire() as conn, conn.transaction():
            await lock_setup(conn, [self.view])  # see the module docstring
            await conn.execute(self._schema.format(table=self.table))
            await ensure_view(conn, self.view, self.table)

    async def publish(self, conn: Connection) -> None:
        """Point the readers' view at this generation's table (idempotent).

        In the rebuild's switch transaction it moves with the generation
        record; elsewhere it runs in a transaction of its own.
        """
        async with conn.transaction():
            await point_view(conn, self.view, self.table)

    async def drop(self) -> None:
        await self._pool.execute(f"DROP TABLE IF EXISTS {self.table}")

    async def apply(self, items: Sequence[Projected]) -> int:
        with postgres_errors(postgres_address(self._pool)):
            async with self._pool.acquire() as conn, conn.transaction():
                return await self._apply(conn, items)

    async def _apply(self, conn: Connection, items: Sequence[Projected]) -> int:
        keys = sorted({item.aggregate_id for item in items})
        upsert, json_columns = await self._upsert_sql(conn)
        await conn.execute(_LOCK_KEYS, self._projection.name, keys)
        # Rows in asyncpg's binary form (Decimal, datetime), not to_jsonb text parsed in
        # Python: decoding that JSON was the store's largest CPU cost.
        rows = await conn.fetch(f"SELECT * FROM {self.table} WHERE {self._key} = ANY($1)", keys)
        current: dict[str, tuple[Document | None, int]] = {}
        for row in rows:
            doc = dict(row)
            for column in json_columns:
                if doc[column] is not None:
                    doc[column] = orjson.loads(doc[column])
            current[str(doc[self._key])] = (doc, int(doc["version"]))
        changed = fold(self._projection, current, items)
        if not changed:
            return 0
        docs = [
            {**doc, self._key: key, "version": version} for key, (doc, version) in changed.items()
        ]
        await conn.execute(upsert, orjson.dumps(docs, default=_json_default).decode())
        return len(changed)

    async def _upsert_sql(self, conn: Connection) -> tuple[str, tuple[str, ...]]:
        """Multi-row upsert from a JSON array (replaces only rows with a lower version).

        Also the table's json and jsonb columns, which asyncpg reads as text.
        """
        if self._upsert is None:
            rows = await conn.fetch(
                "SELECT attname, atttypid::regtype::text AS type FROM pg_attribute"
                " WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped"
                " ORDER BY attnum",
                self.table,
            )
            sets = ", ".join(f"{r['attname']} = EXCLUDED.{r['attname']}" for r in rows)
            self._json_columns = tuple(r["attname"] for r in rows if r["type"] in _JSON_TYPES)
            self._upsert = (
                f"INSERT INTO {self.table}"
                f" SELECT * FROM jsonb_populate_recordset(NULL::{self.table}, $1)"
                f" ON CONFLICT ({self._key}) DO UPDATE SET {sets}"
                f" WHERE {self.table}.version < EXCLUDED.version"
            )
        return self._upsert, self._json_columns

    async def close(self) -> None:
        return None


class PostgresSqlStore:
    """Runs a :class:`SqlProjection` with per-aggregate version gating in one transaction.

    Generation ``g`` writes the tables ``{name}_g{g}`` and keeps its progress
    rows under ``{projection}/g{g}``; readers use views under the plain names.
    """

    publish_in_transaction = True  # see PostgresDocumentStore

    def __init__(
        self, pool: asyncpg.Pool, projection: SqlProjection, *, generation: int = 1
    ) -> None:
        self._pool = pool
        self._projection = projection
        self.generation = generation
        self._tables = {t: f"{t}_g{generation}" for t in projection.tables}
        self._progress_key = f"{projection.name}/g{generation}"

    def at_generation(self, generation: int) -> PostgresSqlStore:
        return PostgresSqlStore(self._pool, self._projection, generation=generation)

    async def setup(self) -> None:
        """Create this generation's tables; create the readers' views that do not exist yet."""
        async with self._pool.acquire() as conn, conn.transaction():
            await lock_setup(conn, list(self._tables))  # see the module docstring
            if self._projection.schema:
                await conn.execute(self._projection.schema.format(**self._tables))
            for view, table in self._tables.items():
                await ensure_view(conn, view, table)

    async def publish(self, conn: Connection) -> None:
        """Point every readers' view at this generation's tables (idempotent), atomically."""
        async with conn.transaction():
            for view, table in self._tables.items():
                await point_view(conn, view, table)

    async def drop(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            for table in self._tables.values():
                await conn.execute(f"DROP TABLE IF EXISTS {table}")
            await conn.execute(
                "DELETE FROM engine_projection_versions WHERE projection = $1", self._progress_key
            )

    async def apply(self, items: Sequence[Projected]) -> int:
        with postgres_errors(postgres_address(self._pool)):
            async with self._pool.acquire() as conn, conn.transaction():
                return await self._apply(conn, items)

    async def _apply(self, conn: Connection, items: Sequence[Projected]) -> int:
        name = self._progress_key
        keys = sorted({item.aggregate_id for item in items})
        await conn.execute(_LOCK_KEYS, name, keys)
        rows = await conn.fetch(
            "SELECT aggregate_id, version FROM engine_projection_versions"
            " WHERE projection = $1 AND aggregate_id = ANY($2)",
            name,
            keys,
        )
        seen = {r["aggregate_id"]: r["version"] for r in rows}
        fresh: list[Projected] = []
        for item in items:
            if item.version > seen.get(item.aggregate_id, 0):
                fresh.append(item)
                seen[item.aggregate_id] = item.version
        if not fresh:
            return 0
        await self._projection.apply_batch(conn, fresh, self._tables)
        latest = {item.aggregate_id: item.version for item in fresh}
        await conn.execute(
            "INSERT INTO engine_projection_versions (projection, aggregate_id, version)"
            " SELECT $1, k, v FROM unnest($2::text[], $3::int[]) AS u(k, v)"
            " ON CONFLICT (projection, aggregate_id) DO UPDATE SET version = EXCLUDED.version",
            name,
            list(latest),
            list(latest.values()),
        )
        return len(fresh)

    async def close(self) -> None:
        return None


async def lock_setup(conn: Connection, views: Sequence[str]) -> None:
    """Serialize set-up of these readers' views until the transaction ends (module docstring)."""
    await conn.execute(_LOCK_SETUP, list(views))


async def ensure_view(conn: Connection, view: str, table: str) -> None:
    """Create the readers' view over ``table`` unless it exists.

    A *table* under the view's name (left by a version before generations)
    would silently shadow the projection: refuse it, saying how to fix it.
    Run it in a transaction: the set-up lock it takes (again, if the caller
    did) is what makes look-up-then-create safe against another daemon.
    """
    await lock_setup(conn, [view])
    kind = await conn.fetchval(
        "SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)", view
    )
    if kind is None:
        await conn.execute(f"CREATE VIEW {view} AS SELECT * FROM {table}")
    elif kind != "v":
        raise ConfigurationError(
            f"{view!r} is a table, not the engine's view of {table!r} (left by an older "
            f"version?): drop it (DROP TABLE {view}) and the daemon recreates the view"
        )


async def point_view(conn: Connection, view: str, table: str) -> None:
    """Make ``view`` read ``table``, unless it already does (no lock taken then).

    Replacing the view takes an exclusive lock on it: at every lane start it
    would wait for readers' queries, hence the check first.
    """
    reads = await conn.fetchval(
        """
        SELECT array_agg(DISTINCT d.refobjid::regclass::text)
        FROM pg_rewrite r JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass
            AND d.objid = r.oid AND d.refclassid = 'pg_class'::regclass
            AND d.refobjid <> r.ev_class
        WHERE r.ev_class = to_regclass($1)
        """,
        view,
    )
    if reads == [table]:
        return
    await conn.execute(f"DROP VIEW IF EXISTS {view}")
    await conn.execute(f"CREATE VIEW {view} AS SELECT * FROM {table}")
