"""Reachability checks for the test fixtures: which services of the stack are missing."""

from __future__ import annotations

import socket

from engine.settings import Settings, env_var

START_COMMAND = "./dev up"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except OSError:
        return False


def unreachable_services(settings: Settings) -> list[str]:
    """One message per service that does not accept connections, naming how to start it."""
    targets = [
        ("PostgreSQL", settings.postgres.host, settings.postgres.port, env_var("postgres", "port")),
        ("Redis", settings.redis.host, settings.redis.port, env_var("redis", "port")),
        ("Kafka", *settings.kafka.first_host_port(), env_var("kafka", "bootstrap_servers")),
        ("Elasticsearch", *settings.elasticsearch.host_port(), env_var("elasticsearch", "url")),
    ]
    return [
        f"{name} is not reachable at {host}:{port} (set by {setting}). "
        f"Start the local stack with: {START_COMMAND}"
        for name, host, port, setting in targets
        if not _reachable(host, port)
    ]
