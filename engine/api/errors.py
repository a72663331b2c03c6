"""Engine errors as HTTP answers: a stable code, a message, and what the client needs.

The mapping follows the error tree, so a domain's own errors (subclasses)
get the right status without touching the API:

- 422 ``validation_failed`` (with ``field``): the request can never succeed as sent;
- 404 ``not_found``; 409 ``rule_violation`` (with ``details``, e.g. both states of a
  refused transition), ``conflict`` (a concurrent change; retry), ``command_id_reused``;
- 503 ``not_yet_consistent`` / ``service_unavailable`` / ``not_ready`` (the schema
  or a projection's view is not set up yet) with Retry-After: the engine's side,
  temporary.

A driver error that an application's query code lets through (it reads the
stores' clients directly) is translated here by the same seam the engine
uses, :mod:`engine.drivers`, and answered like the engine error it becomes.

Anything else is a bug of ours: logged with its traceback, answered 500
without internals.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.drivers import (
    POSTGRES_ERRORS,
    REDIS_ERRORS,
    postgres_address,
    postgres_error,
    redis_address,
    redis_error,
)
from engine.errors import (
    CommandIdReusedError,
    ConfigurationError,
    ConflictError,
    EngineError,
    InvalidInputError,
    NotFoundError,
    NotYetConsistentError,
    RuleViolationError,
    SchemaMissingError,
    TransientError,
    ValidationFailedError,
    WriteNotAppliedError,
)

log = logging.getLogger("engine.api")

RETRY_AFTER_S = "1"


class FieldProblem(BaseModel):
    """One problem of a request that failed validation."""

    model_config = ConfigDict(extra="forbid")

    field: str
    message: str
    type: str


class ApiError(BaseModel):
    """The body of every error answer (what :func:`error_body` builds).

    ``error`` is the stable code to branch on; ``message`` is for people. The
    other members appear only when they apply.
    """

    model_config = ConfigDict(extra="forbid")

    error: str
    message: str
    # The input at fault (422), e.g. ``body.price`` or ``consistency_token``.
    field: str | None = None
    # Every problem found, for a request that failed validation (422).
    errors: list[FieldProblem] | None = None
    # What a refused rule is about, e.g. both states of a refused transition (409).
    details: dict[str, str] | None = None
    # The projection a read waited for (503 not_yet_consistent, write_dead_lettered).
    projection: str | None = None
    # The dead letter to replay (503 write_dead_lettered).
    dead_letter: int | None = None


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """An :class:`ApiError` as JSON; members that do not apply are left out."""
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
    (WriteNotAppliedError, 503, "write_dead_lettered"),
    (TransientError, 503, "service_unavailable"),
    (SchemaMissingError, 503, "not_ready"),
    (ConfigurationError, 503, "misconfigured"),
    (InvalidInputError, 400, "invalid_input"),
    (EngineError, 500, "internal_error"),  # a fault on our side, not the client's
)


def engine_error_response(exc: EngineError) -> JSONResponse:
    """The HTTP answer for an engine error, with what the client needs to act on it."""
    code, name = next((c, n) for kind, c, n in _STATUS if isinstance(exc, kind))
    extra: dict[str, Any] = {
        "field": getattr(exc, "field", None),
        "details": getattr(exc, "details", None),
        "projection": getattr(exc, "projection", None),
        "dead_letter": getattr(exc, "letter_id", None),
    }
    if code >= 500 and not isinstance(exc, TransientError):
        log.error("%s while serving a request: %s", type(exc).__name__, exc)
    # Retrying helps a store that is down or behind, not a dead-lettered write.
    retry = code == 503 and not isinstance(exc, WriteNotAppliedError)
    return _answer(code, error_body(name, str(exc), **extra), retry=retry)


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


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (unknown route, wrong method, missing key) in the same shape."""
    assert isinstance(exc, StarletteHTTPException)
    message = str(exc.detail)
    if exc.status_code == 400 and "parsing the body" in message:
        # A body that is not even text (bad encoding): the client's input, like bad JSON.
        return _answer(422, error_body("validation_failed", message, field="body"))
    name = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
    response = _answer(exc.status_code, error_body(name, message))
    response.headers.update(exc.headers or {})
    if exc.status_code == 405:
        # Every method of the path, not only those of the route that matched first.
        from engine.api.openapi import allowed_methods  # noqa: PLC0415 - it imports this module

        methods = allowed_methods(request.app.openapi(), request.url.path)
        if methods:
            response.headers["Allow"] = ", ".join(methods)
    return response


async def _engine_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EngineError)
    return engine_error_response(exc)


def _translated(request: Request, exc: Exception) -> EngineError | None:
    """A driver error from the read side's clients, as :mod:`engine.drivers` translates it."""
    context = getattr(request.app.state, "context", None)
    if context is None:  # the application is not serving yet
        return None
    reads = context.reads
    return redis_error(exc, redis_address(reads.redis)) or postgres_error(
        exc, postgres_address(reads.pool)
    )


async def _driver_error(request: Request, exc: Exception) -> JSONResponse:
    translated = _translated(request, exc)
    if translated is None:
        return await _unexpected(request, exc)
    log.warning("%s %s: %s", request.method, request.url.path, translated)
    return engine_error_response(translated)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return _answer(500, error_body("internal_error", "an unexpected error; it has been logged"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(EngineError, _engine_error)
    for kind in (*POSTGRES_ERRORS, *REDIS_ERRORS):
        app.add_exception_handler(kind, _driver_error)
    app.add_exception_handler(Exception, _unexpected)
