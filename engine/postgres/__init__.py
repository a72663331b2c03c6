"""The engine's PostgreSQL side: connection pool, schema migrations, event log and outbox."""
