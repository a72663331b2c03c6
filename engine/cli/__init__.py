"""The ``engine`` command line."""

from engine.cli.app import app, main

__all__ = ["app", "main"]
