"""API keys: writers may send commands (and read), readers may only read. Off when unset."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyHeader
from pydantic import SecretStr

# One header, two schemes in the OpenAPI document, so that it says which key an
# operation needs (engine.api.openapi keeps a scheme only when its key is set).
WRITER_SCHEME = "WriterKey"
READER_SCHEME = "ReaderKey"
_WRITER_KEY = APIKeyHeader(
    name="X-API-Key",
    scheme_name=WRITER_SCHEME,
    description="The writer key (ENGINE_API__WRITER_KEY): commands, and queries too.",
    auto_error=False,
)
_READER_KEY = APIKeyHeader(
    name="X-API-Key",
    scheme_name=READER_SCHEME,
    description="The reader key (ENGINE_API__READER_KEY), or the writer key: queries.",
    auto_error=False,
)


def _matches(given: str | None, *keys: SecretStr | None) -> bool:
    # compare_digest on every configured key: the time taken does not tell which matched.
    results = [
        secrets.compare_digest((given or "").encode(), key.get_secret_value().encode())
        for key in keys
        if key is not None
    ]
    return any(results)


async def require_writer(
    request: Request, key: Annotated[str | None, Depends(_WRITER_KEY)] = None
) -> None:
    api = request.app.state.settings.api
    if api.writer_key is not None and not _matches(key, api.writer_key):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "commands need the writer API key in the X-API-Key header",
        )


async def require_reader(
    request: Request, key: Annotated[str | None, Depends(_READER_KEY)] = None
) -> None:
    api = request.app.state.settings.api
    if api.reader_key is not None and not _matches(key, api.reader_key, api.writer_key):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "queries need the reader (or writer) API key in the X-API-Key header",
        )


# Route dependencies: ``@router.post(..., dependencies=[WRITER])``.
WRITER = Depends(require_writer)
READER = Depends(require_reader)
