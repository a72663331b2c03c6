"""Elasticsearch projection store: one document per aggregate, written with compare-and-set.

Progress lives in the document: its ``_v`` field is the aggregate version it
reflects. A batch is applied with one ``_mget`` (real-time, so it sees writes
not yet refreshed) and one ``_bulk``: existing documents are replaced with
``if_seq_no``/``if_primary_term`` (they must not have changed since the read),
new ones with ``create`` (they must not exist yet). A document that changed
meanwhile answers 409 and is re-read and re-folded.

Why compare-and-set and not ``version_type=external`` with the aggregate
version: both make a redelivered or older event harmless, but external
versioning only compares numbers, so a document folded from a stale read (two
daemons overlapping on a partition during a rebalance) would still be accepted
if its number is higher, silently dropping the event in between. Compare-and-
set rejects any write whose base moved, and the fold skips versions at or below
``_v``, so the outcome is the same as applying every event once, in order.

The documents a batch starts from come from the store's
:class:`~engine.stores.cache.DocumentCache` where it knows them, with the
``_seq_no``/``_primary_term`` the last write answered, and from the ``_mget``
for the rest; compare-and-set is what makes a stale entry harmless (a 409, a
read, a second fold). The bulk body is encoded here, once, with orjson.

The projection writes through an alias (``{alias}`` -> ``{alias}-v{n}``) so a
rebuild can fill a new index and switch the alias atomically.

Set-up is safe to run from several daemons at once. Both steps check first
and then act, so two daemons starting together both see "missing" and both
create: the index creation that loses answers 400
``resource_already_exists_exception``, which here means exactly what was
wanted (the index of this generation exists, with the mappings every daemon
of this version asks for), so it counts as success. Adding the alias needs no
such care: adding an alias an index already has is acknowledged, so racers
pointing it at the same generation's index all succeed. Set-up only creates
an alias where there is none; moving it between generations is
:meth:`publish`'s job (one atomic update, run after set-up whenever a
generation is taken up), so even racers of two generations on a fresh
cluster, which could both add it, leave it on one index once published.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from elasticsearch import ApiError, AsyncElasticsearch, BadRequestError, NotFoundError
from elasticsearch.serializer import OrjsonSerializer

from engine.drivers import elasticsearch_address, elasticsearch_errors
from engine.errors import PoisonError, TransientError
from engine.projection import Document, DocumentProjection, Projected, fold_and_write
from engine.stores.cache import DEFAULT_MAX_DOCUMENTS, Cached, DocumentCache, Plan
from engine.stores.refresh import refresher

_BULK_ANSWER = [
    f"items.*.{field}" for field in ("_id", "_index", "status", "_seq_no", "_primary_term", "error")
]
_JSON = OrjsonSerializer()  # the client's own encoding of values orjson lacks (Decimal)

VERSION_FIELD = "_v"


class ElasticsearchDocumentStore:
    """Documents of the index behind ``alias``, folded by a document projection."""

    def __init__(
        self,
        client: AsyncElasticsearch,
        projection: DocumentProjection,
        alias: str,
        mappings: Mapping[str, Any],
        *,
        settings: Mapping[str, Any] | None = None,
        generation: int = 1,
        refresh_after_write_s: float | None = None,
        cache_documents: int = DEFAULT_MAX_DOCUMENTS,
    ) -> None:
        self._client = client
        self._projection = projection
        self.alias = alias
        self.generation = generation
        self.index = f"{alias}-v{generation}"
        self._mappings = {**mappings}
        self._settings = dict(settings or {"number_of_shards": 1, "number_of_replicas": 0})
        # Per generation: a new generation's store starts knowing nothing.
        self.cache = DocumentCache(cache_documents)
        # When writes become searchable: engine.stores.refresh (None: the index's interval).
        self._refresh_after_write_s = refresh_after_write_s
        self._refresher = refresher(client, self.index, refresh_after_write_s)

    def at_generation(self, generation: int) -> ElasticsearchDocumentStore:
        return ElasticsearchDocumentStore(
            self._client,
            self._projection,
            self.alias,
            self._mappings,
            settings=self._settings,
            generation=generation,
            refresh_after_write_s=self._refresh_after_write_s,
            cache_documents=self.cache.max_documents,
        )

    def forget_cached(self) -> None:
        self.cache.clear()

    async def setup(self) -> None:
        """Create this generation's index; point the alias at it if the alias does not exist."""
        with elasticsearch_errors(elasticsearch_address(self._client)):
            # Checked separately: a crash between the two steps leaves the index behind.
            if not await self._client.indices.exists(index=self.index):
                await self.create_index(self.index)
            if not await self._client.indices.exists_alias(name=self.alias):
                # Idempotent for one index: racers of this generation all succeed.
                await self._client.indices.put_alias(index=self.index, name=self.alias)

    async def create_index(self, index: str) -> None:
        """Create ``index`` with this store's mappings; one that already exists is success.

        Another daemon setting up the same generation may create it between
        our check and our request (see the module docstring).
        """
        properties = {**self._mappings.get("properties", {}), VERSION_FIELD: {"type": "integer"}}
        try:
            await self._client.indices.create(
                index=index,
                mappings={**self._mappings, "properties": properties},
                settings=self._settings,
            )
        except BadRequestError as exc:
            if exc.error != "resource_already_exists_exception":
                raise

    async def publish(self, conn: object) -> None:
        """Move the alias to this generation's index alone, in one atomic alias update.

        Idempotent (nothing happens when the alias already points here only),
        and only ever called after the generation is committed in Postgres
        (see :mod:`engine.generations`): an alias moved earlier could outlive a
        switch that never committed. Two callers may move it at once (a lane
        and the rebuild, both to the committed generation): the loser's update
        names an alias the winner removed, so it reads again.
        """
        try:
            with elasticsearch_errors(elasticsearch_address(self._client)):
                await self._move_alias()
        except ApiError as exc:
            # Any other refusal too: readers must end up on the committed
            # generation, so the caller retries the move until it goes through.
            raise TransientError(f"Elasticsearch answered {exc.meta.status}: {exc}") from exc

    async def _move_alias(self) -> None:
        for _ in range(3):
            try:
                current = set((await self._client.indices.get_alias(name=self.alias)).body)
            except NotFoundError:
                current = set()
            if current == {self.index}:
                return
            actions: list[dict[str, Any]] = [
                {"remove": {"index": index, "alias": self.alias}}
                for index in current
                if index != self.index
            ]
            actions.append({"add": {"index": self.index, "alias": self.alias}})
            try:
                await self._client.indices.update_aliases(actions=actions)
                return
            except NotFoundError:
                continue
        raise TransientError(f"the alias {self.alias} keeps moving; retry")

    async def drop(self) -> None:
        await self._client.indices.delete(index=self.index, ignore_unavailable=True)

    async def apply(self, items: Sequence[Projected]) -> int:
        # A 4xx answer passes through: the projection's failure, counted by the lane.
        with elasticsearch_errors(elasticsearch_address(self._client)):
            return await self._apply(items)

    async def _apply(self, items: Sequence[Projected]) -> int:
        stamps: dict[str, tuple[str, int, int]] = {}
        plan = Plan()

        async def read(ids: Sequence[str]) -> dict[str, tuple[Document | None, int]]:
            current, fresh = await self._read(ids)
            stamps.update(fresh)
            return current

        async def write(changed: dict[str, tuple[Document, int]], _current: object) -> set[str]:
            for aggregate_id, known in plan.known.items():
                if known is not None:
                    stamps[aggregate_id] = known.stamp
            return await self._write(changed, stamps)

        return await fold_and_write(
            self._projection, items, read, write, cache=self.cache, plan=plan
        )

    async def _read(
        self, ids: Sequence[str]
    ) -> tuple[dict[str, tuple[Document | None, int]], dict[str, tuple[str, int, int]]]:
        try:
            found = await self._client.mget(index=self.index, ids=list(ids), realtime=True)
        except NotFoundError as exc:
            raise TransientError(f"index {self.index} is missing; run setup") from exc
        current: dict[str, tuple[Document | None, int]] = {}
        stamps: dict[str, tuple[str, int, int]] = {}
        for doc in found["docs"]:
            if doc.get("found"):
                source = dict(doc["_source"])
                version = int(source.pop(VERSION_FIELD, 0))
                stamp = (doc["_index"], doc["_seq_no"], doc["_primary_term"])
                current[doc["_id"]] = (source, version)
                stamps[doc["_id"]] = stamp
                self.cache.put(doc["_id"], Cached(source, version, stamp))
        return current, stamps

    async def _write(
        self, changed: dict[str, tuple[Document, int]], stamps: dict[str, tuple[str, int, int]]
    ) -> set[str]:
        lines: list[bytes] = []
        sources: dict[str, tuple[bytes, int]] = {}
        for doc_id, (doc, version) in changed.items():
            if doc_id in stamps:
                index, seq_no, term = stamps[doc_id]
                action = {
                    "index": {
                        "_index": index,
                        "_id": doc_id,
                        "if_seq_no": seq_no,
                        "if_primary_term": term,
                    }
                }
            else:
                action = {"create": {"_index": self.index, "_id": doc_id}}
            source = _JSON.dumps({**doc, VERSION_FIELD: version})
            sources[doc_id] = (source, version)
            lines += [orjson.dumps(action), source]
        # Encoded already: the client's ndjson serializer passes bytes through as they are.
        body = b"\n".join(lines) + b"\n"
        response = await self._client.bulk(
            operations=body,  # type: ignore[arg-type]
            # Only what is read below: the full answer per document (shards, result,
            # version) cost as much to parse as the documents cost to encode.
            filter_path=_BULK_ANSWER,
        )
        self._refresher.written()
        conflicts: set[str] = set()
        for entry in response["items"]:
            result = next(iter(entry.values()))
            status = result.get("status", 200)
            if status == 409:
                conflicts.add(result["_id"])
            elif status >= 500 or status == 429:
                raise TransientError(f"Elasticsearch refused a write ({status}): {result}")
            elif status >= 400:
                raise PoisonError(f"Elasticsearch rejected document {result['_id']}: {result}")
            else:
                source, version = sources[result["_id"]]
                # What a read would give back: the source as stored, with the new stamp.
                stored = orjson.loads(source)
                del stored[VERSION_FIELD]
                stamp = (result["_index"], result["_seq_no"], result["_primary_term"])
                self.cache.put(result["_id"], Cached(stored, version, stamp))
        return conflicts

    async def close(self) -> None:
        await self._refresher.close()
