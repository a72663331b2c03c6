"""The HTTP API: the engine's generic part (context, errors, keys, limits, health).

Applications add their own command and query endpoints as FastAPI routers
(``Application.api``), using :func:`api_context` to reach the command bus and
the read side, :data:`WRITER` / :data:`READER` to guard them with keys, and
:func:`error_responses` to declare the error statuses they can answer.
"""

from engine.api.app import create_app
from engine.api.context import ApiContext, api_context, consistency_token
from engine.api.errors import ApiError
from engine.api.openapi import error_responses
from engine.api.security import READER, WRITER

__all__ = [
    "READER",
    "WRITER",
    "ApiContext",
    "ApiError",
    "api_context",
    "consistency_token",
    "create_app",
    "error_responses",
]
