"""Engine errors as HTTP answers: a stable code, a message, and what the client needs.

The mapping follows the error tree, so a domain's own errors (subclasses)
get the right status without touching the API:

- 422 ``validation_failed`` (with ``field``): the request can never succeed as sent;
- 404 ``not_found``; 409 ``rule_violation`` (with ``details``, e.g. both states of a
  refused transition), ``conflict`` (a concurrent change; retry), ``command_id_reused``;
- 503 ``not_yet_consistent`` / ``service_unavailable`` with Retry-After: the
  engine's side, temporary.

Anything else is a bug of ours: logged with its traceback, answered 500
without internals.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from engine.errors import (
    CommandIdReusedError,
    ConfigurationError,
    ConflictError,
    EngineError,
    NotFoundError,
    NotYetConsistentError,
    RuleViolationError,
    TransientError,
    ValidationFailedError,
)

log = logging.getLogger("engine.api")

RETRY_AFTER_S = "1"


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": code, "message": message, **{k: v for k, v in extra.items() if v}}


def _answer(code: int, body: dict[str, Any], retry: bool = False) -> JSONResponse:
    headers = {"Retry-After": RETRY_AFTER_S} if retry else None
    return JSONResponse(body, status_code=code, headers=headers)


# Most specific first: the first class that matches decides.
_STATUS: tuple[tuple[type[EngineError], int, str], ...] = (
    (ValidationFailedError, 422, "validation_failed"),
    (NotFoundError, 404, "not_found"),
    (RuleViolationError, 409, "rule_violation"),
    (CommandIdReusedError, 409, "command_id_reused"),
    (ConflictError, 409, "conflict"),
    (NotYetConsistentError, 503, "not_yet_consistent"),
    (TransientError, 503, "service_unavailable"),
    (ConfigurationError, 503, "misconfigured"),
    (EngineError, 400, "invalid_input"),
)


def engine_error_response(exc: EngineError) -> JSONResponse:
    """The HTTP answer for an engine error, with what the client needs to act on it."""
    code, name = next((c, n) for kind, c, n in _STATUS if isinstance(exc, kind))
    extra: dict[str, Any] = {
        "field": getattr(exc, "field", None),
        "details": getattr(exc, "details", None),
        "projection": getattr(exc, "projection", None),
    }
    if isinstance(exc, ConfigurationError):
        log.error("configuration error while serving a request: %s", exc)
    return _answer(code, error_body(name, str(exc), **extra), retry=code == 503)


def _field_path(location: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in location)


async def _request_validation(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": _field_path(e.get("loc", ())), "message": e.get("msg", ""), "type": e["type"]}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"field": "", "message": "invalid request"}
    return _answer(
        status.HTTP_422_UNPROCESSABLE_CONTENT,
        error_body(
            "validation_failed",
            f"{first['field']}: {first['message']}",
            field=first["field"],
            errors=errors,
        ),
    )


async def _engine_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EngineError)
    return engine_error_response(exc)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return _answer(500, error_body("internal_error", "an unexpected error; it has been logged"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(EngineError, _engine_error)
    app.add_exception_handler(Exception, _unexpected)
