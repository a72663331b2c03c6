"""The native local stack: PostgreSQL, Redis, Kafka and Elasticsearch without Docker."""

from engine.stack.manager import SERVICE_NAMES, ServiceStatus, StackManager

__all__ = ["SERVICE_NAMES", "ServiceStatus", "StackManager"]
