"""Projection stores: Postgres, Redis and Elasticsearch behind one small protocol."""
