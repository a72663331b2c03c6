"""The event topic: created on start-up with the configured partition count if missing, and
its partitions read without creating it."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from engine.drivers import START_HINT, kafka_address, kafka_errors
from engine.settings import KafkaSettings


async def ensure_topic(kafka: KafkaSettings, topic: str | None = None) -> bool:
    """Create ``topic`` (default: the configured one) if it does not exist; True if created."""
    name = topic or kafka.topic
    admin = AIOKafkaAdminClient(
        bootstrap_servers=kafka.bootstrap_servers,
        request_timeout_ms=int(kafka.request_timeout_s * 1000),
    )
    try:
        with kafka_errors(kafka_address(kafka), START_HINT):
            await admin.start()
            if name in await admin.list_topics():
                return False
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            name,
                            num_partitions=kafka.partitions,
                            replication_factor=kafka.replication_factor,
                        )
                    ]
                )
            except TopicAlreadyExistsError:
                return False  # another process created it between our check and our create
            return True
    finally:
        await admin.close()


async def topic_partitions(kafka: KafkaSettings) -> list[int]:
    """The topic's partitions, or none if it does not exist (without creating it)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=kafka.bootstrap_servers,
        request_timeout_ms=int(kafka.request_timeout_s * 1000),
    )
    try:
        await admin.start()
        # Listing first: asking for a missing topic by name may auto-create it on some brokers.
        if kafka.topic not in await admin.list_topics():
            return []
        described = await admin.describe_topics([kafka.topic])
    finally:
        await admin.close()
    return sorted(int(p["partition"]) for topic in described for p in topic["partitions"])
