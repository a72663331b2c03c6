"""Redis projection store: one hash per aggregate, written by a version-gated Lua script.

Progress lives in the effect itself: every hash carries its aggregate version
in the ``_v`` field. The store folds a batch in memory onto the current hashes
of its aggregates and writes all changed hashes with one Lua script, which
Redis runs atomically. The script changes a hash only if its ``_v`` still
equals the version the fold started from (compare-and-set); a key that changed
meanwhile (another daemon during a rebalance) is reported back, re-read and
re-folded. Re-applying a batch is harmless: the fold skips every event whose
version is not above ``_v``.

The current hashes come from the store's :class:`~engine.stores.cache.DocumentCache`
where it knows them (what this process last wrote), and from one read script
for the rest; the compare-and-set above is what makes a stale entry harmless.
Because the base is exactly what the hash holds at that version, the script
writes only the fields that changed and deletes the ones that went away. Each
hash travels as three arguments (base version, the fields to set and the
fields to delete as JSON arrays that the script decodes with ``cjson``), not
two per field: packing one argument per field was the daemon's largest Redis
cost in the profile.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
import redis.asyncio as aioredis

from engine.drivers import redis_address, redis_errors
from engine.projection import Document, DocumentProjection, Projected, fold_and_write
from engine.stores.cache import DEFAULT_MAX_DOCUMENTS, Cached, DocumentCache

VERSION_FIELD = "_v"

# KEYS: the hashes. ARGV, per key: base version, JSON [field, value, ...] to set, JSON
# [field, ...] to delete. Returns the keys whose version moved since they were read.
_CAS_SCRIPT = """
local conflicts = {}
for k = 1, #KEYS do
  local base = ARGV[3 * k - 2]
  local current = redis.call('HGET', KEYS[k], '_v') or '0'
  if current == base then
    if base == '0' then
      redis.call('DEL', KEYS[k])
    end
    local set = cjson.decode(ARGV[3 * k - 1])
    if #set > 0 then
      redis.call('HSET', KEYS[k], unpack(set))
    end
    local gone = cjson.decode(ARGV[3 * k])
    if #gone > 0 then
      redis.call('HDEL', KEYS[k], unpack(gone))
    end
  else
    table.insert(conflicts, KEYS[k])
  end
end
return conflicts
"""


# KEYS: the hashes. Returns each one's flat field/value list (empty when missing).
_READ_MANY_SCRIPT = """
local hashes = {}
for k = 1, #KEYS do
  hashes[k] = redis.call('HGETALL', KEYS[k])
end
return hashes
"""


def to_field(value: Any) -> str:
    """How a document value is stored in a hash field."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def generation_pointer(base_prefix: str) -> str:
    """The key that tells readers which generation of hashes to read."""
    return f"{base_prefix}current"


def generation_prefix(base_prefix: str, generation: int | str) -> str:
    return f"{base_prefix}g{generation}:"


class RedisHashStore:
    """Hashes ``{base}g{generation}:{aggregate_id}`` folded by a document projection.

    Readers first read ``{base}current`` (the generation number), which a
    rebuild sets when it switches; a lost Redis is refilled the same way.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        projection: DocumentProjection,
        base_prefix: str,
        generation: int = 1,
        *,
        cache_documents: int = DEFAULT_MAX_DOCUMENTS,
    ) -> None:
        self._client = client
        self._projection = projection
        self.base_prefix = base_prefix
        self.generation = generation
        self.key_prefix = generation_prefix(base_prefix, generation)
        self._script = client.register_script(_CAS_SCRIPT)
        self._read_script = client.register_script(_READ_MANY_SCRIPT)
        # Per generation: a new generation's store starts knowing nothing.
        self.cache = DocumentCache(cache_documents)

    def at_generation(self, generation: int) -> RedisHashStore:
        return RedisHashStore(
            self._client,
            self._projection,
            self.base_prefix,
            generation,
            cache_documents=self.cache.max_documents,
        )

    def forget_cached(self) -> None:
        self.cache.clear()

    async def setup(self) -> None:
        await self._client.set(generation_pointer(self.base_prefix), self.generation, nx=True)

    async def publish(self, conn: object) -> None:
        """Point readers at this generation (idempotent).

        Only ever called after the generation is committed in Postgres (see
        :mod:`engine.generations`): a pointer moved earlier could outlive a
        switch that never committed.
        """
        with redis_errors(redis_address(self._client)):
            await self._client.set(generation_pointer(self.base_prefix), self.generation)

    async def drop(self) -> None:
        batch: list[str] = []
        async for key in self._client.scan_iter(match=f"{self.key_prefix}*", count=1000):
            batch.append(_text(key))
            if len(batch) >= 1000:
                await self._client.unlink(*batch)
                batch = []
        if batch:
            await self._client.unlink(*batch)

    async def apply(self, items: Sequence[Projected]) -> int:
        with redis_errors(redis_address(self._client)):
            return await self._apply(items)

    async def _apply(self, items: Sequence[Projected]) -> int:
        return await fold_and_write(
            self._projection, items, self._read, self._write, cache=self.cache
        )

    async def _read(self, ids: Sequence[str]) -> dict[str, tuple[Document | None, int]]:
        # One script call for the whole batch: a pipeline of HGETALLs costs the
        # client a command to pack and a reply to parse per key, which profiled
        # as the daemon's largest CPU cost.
        hashes = await self._read_script(keys=[self.key_prefix + i for i in ids])
        current: dict[str, tuple[Document | None, int]] = {}
        for aggregate_id, flat in zip(ids, hashes, strict=True):
            if flat:
                doc = {_text(k): _text(v) for k, v in zip(flat[::2], flat[1::2], strict=True)}
                version = int(doc.pop(VERSION_FIELD, "0"))
                current[aggregate_id] = (doc, version)
                self.cache.put(aggregate_id, Cached(doc, version))
        return current

    async def _write(
        self,
        changed: dict[str, tuple[Document, int]],
        current: dict[str, tuple[Document | None, int]],
    ) -> set[str]:
        keys: list[str] = []
        args: list[str | bytes] = []
        written: list[tuple[str, dict[str, str], int]] = []
        for aggregate_id, (doc, version) in changed.items():
            fields = {k: to_field(v) for k, v in doc.items() if v is not None}
            base_doc, base = current.get(aggregate_id, (None, 0))
            if base and base_doc is not None:
                # The hash holds exactly base_doc at version base (the script checks
                # the version): only what differs needs writing.
                to_set = [x for k, v in fields.items() if base_doc.get(k) != v for x in (k, v)]
                gone = [k for k in base_doc if k not in fields]
            else:
                to_set, gone = [x for kv in fields.items() for x in kv], []
            to_set += [VERSION_FIELD, str(version)]
            keys.append(self.key_prefix + aggregate_id)
            args += [str(base), orjson.dumps(to_set), orjson.dumps(gone)]
            written.append((aggregate_id, fields, version))
        conflicts = {
            _text(key).removeprefix(self.key_prefix)
            for key in await self._script(keys=keys, args=args)
        }
        for aggregate_id, fields, version in written:
            if aggregate_id not in conflicts:
                self.cache.put(aggregate_id, Cached(fields, version))
        return conflicts

    async def close(self) -> None:
        return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# KEYS[1]: the generation pointer. ARGV: base prefix, aggregate id. One round trip,
# and atomic, so a rebuild switching generations never splits the two reads.
_READ_SCRIPT = """
local generation = redis.call('GET', KEYS[1]) or '1'
return redis.call('HGETALL', ARGV[1] .. 'g' .. generation .. ':' .. ARGV[2])
"""


class RedisHashReader:
    """Reads the current generation's hash of one aggregate (the query side of the store)."""

    def __init__(self, client: aioredis.Redis, base_prefix: str) -> None:
        self._client = client
        self._base_prefix = base_prefix
        self._script = client.register_script(_READ_SCRIPT)

    async def get(self, aggregate_id: str) -> tuple[dict[str, str], int] | None:
        """The hash's fields and its version, or None when there is no such key."""
        with redis_errors(redis_address(self._client)):
            flat = await self._script(
                keys=[generation_pointer(self._base_prefix)],
                args=[self._base_prefix, aggregate_id],
            )
        if not flat:
            return None
        fields = {_text(k): _text(v) for k, v in zip(flat[::2], flat[1::2], strict=True)}
        return fields, int(fields.pop(VERSION_FIELD, "0"))
