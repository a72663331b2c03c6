"""The OpenAPI document as a contract: what it promises is what the server does.

A client generated from the document must be able to trust it both ways:
every request the schema allows is one the server can accept (it may still
refuse it for the *state* of things, 404/409/503, never as malformed), every
request the schema forbids is refused as malformed (422), and every answer the
server can give is declared, with its body's schema. FastAPI's own document
falls short of that; the gaps are closed in one place, here:

- **Error answers.** Every error body is an :class:`~engine.api.errors.ApiError`
  (built by :func:`~engine.api.errors.error_body`). Routes declare the statuses
  only they know about with :func:`error_responses` (404 where the operation
  names something that may not exist, 409 where a rule or a concurrent write can
  refuse a command, 503 wherever a store is read or written). What holds for
  every operation alike is added by :func:`openapi_document`: 422 in our shape
  (not FastAPI's ``HTTPValidationError``), 413 for an operation with a body
  (:class:`~engine.api.limits.BodyLimit` refuses it before anything parses it),
  401 for an operation whose key is configured. 500 is not declared: it is a bug.
- **API keys.** ``require_writer`` / ``require_reader`` check a key only when
  one is configured, so a security requirement (and its scheme) appears only
  then, per operation: commands need the writer key (scheme ``WriterKey``),
  queries the reader key (``ReaderKey``; the writer key works too) once one is set.
- **Consistency tokens.** The server refuses a token that it could not have
  issued: a partition beyond the configured count, a position beyond a bigint,
  leading zeros or blanks. :func:`token_pattern` is that exact set, built from
  the settings; the ``consistency_token`` dependency checks the same pattern,
  so the document and the server cannot disagree.
- **NUL characters.** A command refuses NUL in any string (PostgreSQL text
  cannot hold one), so every string in a request body without a pattern of its
  own gets :data:`NO_NUL`; an application's own patterns (see
  ``projections/orders/commands.py``) exclude NUL themselves.

- **Formats.** What the server parses is what the schema states: an
  application writes its constraints as patterns every regex dialect reads the
  same (ECMA for clients, Rust for pydantic, Python), e.g. a price is a string
  with at most 2 decimals or a whole number, never a float.
- **Allow.** A 405 names every method the document lists for the path
  (:func:`allowed_methods`), not only those of the route Starlette tried first.

What JSON Schema cannot say (a rule between two parameters, such as a date
range's end not before its start, or a cursor that must be one the API issued)
is written in the operation's description and declared as a possible 422.

``tests/integration/api/test_schemathesis.py`` holds the server to all of it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from engine.api.errors import ApiError
from engine.api.security import READER_SCHEME, WRITER_SCHEME
from engine.settings import Settings

# Strings without a pattern of their own, in request bodies: no NUL anywhere.
NO_NUL = r"^[^\x00]*$"
# Positions are PostgreSQL bigints.
MAX_POSITION = 2**63 - 1
TOKEN_PARAMETERS = ("consistency_token", "x-consistency-token")

_DESCRIPTIONS = {
    401: "The API key is missing or wrong (only when keys are configured).",
    404: "What the request names does not exist (``not_found``).",
    409: "Refused by a rule (``rule_violation``, with ``details``), by a concurrent change "
    "(``conflict``: retry), or a command id reused with other content (``command_id_reused``).",
    413: "The request body is larger than the configured limit (``payload_too_large``).",
    422: "The request is malformed (``validation_failed``, naming the ``field``).",
    503: "A store is unavailable or not set up yet (``service_unavailable``, ``not_ready``), "
    "or the read did not reach the consistency token's write in time "
    "(``not_yet_consistent``), or cannot since the write was dead-lettered "
    "(``write_dead_lettered``). Retry after Retry-After seconds when it is given.",
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying (absent when retrying cannot help).",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the error statuses it can answer, with the error body."""
    responses: dict[int | str, dict[str, Any]] = {}
    for code in statuses:
        responses[code] = {"model": ApiError, "description": _DESCRIPTIONS[code]}
        if code == 503:
            responses[code]["headers"] = _RETRY_AFTER
    return responses


def _at_most(maximum: int) -> str:
    """A regular expression for the decimal numbers 0..maximum, without leading zeros."""
    text = str(maximum)
    width = len(text)
    options = ["0"]
    if width > 2:
        options.append(f"[1-9][0-9]{{0,{width - 2}}}")
    elif width == 2:
        options.append("[1-9]")
    for i, digit in enumerate(text):
        low, high = (1 if i == 0 else 0), int(digit) - 1
        if high < low:
            continue
        rest = width - i - 1
        digits = str(low) if low == high else f"[{low}-{high}]"
        options.append(text[:i] + digits + (f"[0-9]{{{rest}}}" if rest else ""))
    options.append(text)
    return "|".join(dict.fromkeys(options))


@cache
def token_pattern(partitions: int) -> str:
    """Exactly the tokens this API can issue: ``<partition>.<position>``, as encoded."""
    return rf"^(?:{_at_most(partitions - 1)})\.(?:{_at_most(MAX_POSITION)})$"


@cache
def token_regex(partitions: int) -> re.Pattern[str]:
    return re.compile(token_pattern(partitions))


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            yield path, method, operation


def _secure(document: dict[str, Any], settings: Settings) -> None:
    """Security, and 401, only on operations whose key is configured."""
    # A writer key also reads, but queries are open unless a reader key is set.
    configured = {
        name
        for name, key in (
            (WRITER_SCHEME, settings.api.writer_key),
            (READER_SCHEME, settings.api.reader_key),
        )
        if key is not None
    }
    for _, _, operation in _operations(document):
        required = [
            requirement
            for requirement in operation.pop("security", [])
            if set(requirement) <= configured
        ]
        if required:
            operation["security"] = required
            operation["responses"]["401"] = _error_response(401)
    components = document.get("components", {})
    schemes = {
        name: scheme
        for name, scheme in components.pop("securitySchemes", {}).items()
        if name in configured
    }
    if schemes:
        components["securitySchemes"] = schemes


def _error_response(code: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _DESCRIPTIONS[code],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ApiError"}}},
    }
    if code == 503:
        response["headers"] = _RETRY_AFTER
    return response


def _body_schemas(document: dict[str, Any]) -> set[str]:
    """Names of the component schemas a request body reaches."""
    schemas = document.get("components", {}).get("schemas", {})
    names: set[str] = set()
    pending: list[Any] = [
        operation["requestBody"]
        for _, _, operation in _operations(document)
        if "requestBody" in operation
    ]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                name = ref.rsplit("/", 1)[1]
                if name not in names:
                    names.add(name)
                    pending.append(schemas.get(name))
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return names


def _no_nul(node: Any) -> None:
    """Every string of a request body schema without a pattern or format: :data:`NO_NUL`."""
    if isinstance(node, list):
        for item in node:
            _no_nul(item)
        return
    if not isinstance(node, dict):
        return
    if node.get("type") == "string" and not {"pattern", "format", "enum", "const"} & node.keys():
        node["pattern"] = NO_NUL
    for value in node.values():
        _no_nul(value)


def openapi_document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The document FastAPI builds from the routes, made truthful (see the module docstring)."""
    document = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for model in (ApiError,):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    pattern = token_pattern(settings.kafka.partitions)
    for _, _, operation in _operations(document):
        responses = operation["responses"]
        if "422" in responses:
            responses["422"] = _error_response(422)
        if "requestBody" in operation:
            responses["413"] = _error_response(413)
        for parameter in operation.get("parameters", []):
            if parameter["name"] in TOKEN_PARAMETERS:
                parameter["schema"] = {"type": "string", "pattern": pattern}
    _secure(document, settings)
    for name in _body_schemas(document):
        _no_nul(schemas[name])
    return document


def allowed_methods(document: dict[str, Any], path: str) -> list[str]:
    """The methods the document lists for ``path`` (``Allow`` on a 405), sorted.

    Starlette answers 405 with the methods of the first route that matched the
    path only; GET /orders and POST /orders live in two routers, so it would
    name one of them. The document names both.
    """
    methods: set[str] = set()
    for template, item in document.get("paths", {}).items():
        if _template_regex(template).fullmatch(path):
            methods.update(method.upper() for method in item)
    return sorted(methods)


@cache
def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", template)
    return re.compile(
        "".join("[^/]+" if part.startswith("{") else re.escape(part) for part in parts)
    )


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Serve :func:`openapi_document` as ``/openapi.json`` (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_document(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
