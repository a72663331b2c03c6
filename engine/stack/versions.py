"""Versions of the services the local stack runs, pinned in one place.

docker-compose.yml uses the same versions; ``tests/unit/test_compose.py`` holds
the two together.
"""

from __future__ import annotations

# Kafka 3.9 is the last line that keeps every old protocol version; aiokafka
# 0.14 negotiates some that Kafka 4.0 removed (KIP-896), so 3.9 is the broker we
# can promise works. KRaft mode, no ZooKeeper.
KAFKA_VERSION = "3.9.2"
KAFKA_SCALA_VERSION = "2.13"
# slf4j 1.7 is what Kafka 3.9 logs through; reload4j is its log4j-1.2 backend.
SLF4J_VERSION = "1.7.36"

# 8.x runs on Java 17 (9.x wants Java 21). The Python client is pinned to 8.x
# in pyproject.toml because a 9.x client is refused by an 8.x server.
ELASTICSEARCH_VERSION = "8.19.21"

# Debian packages: the distribution's supported versions.
POSTGRES_PACKAGE = "postgresql"
REDIS_PACKAGE = "redis-server"
MIN_JAVA_MAJOR = 17
