"""API keys: writers may send commands (and read), readers may only read. Off when unset."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyHeader
from pydantic import SecretStr

_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False)


def _matches(given: str | None, *keys: SecretStr | None) -> bool:
    # compare_digest on every configured key: the time taken does not tell which matched.
    results = [
        secrets.compare_digest((given or "").encode(), key.get_secret_value().encode())
        for key in keys
        if key is not None
    ]
    return any(results)


async def require_writer(
    request: Request, key: Annotated[str | None, Depends(_KEY_HEADER)] = None
) -> None:
    api = request.app.state.settings.api
    if api.writer_key is not None and not _matches(key, api.writer_key):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "commands need the writer API key in the X-API-Key header",
        )


async def require_reader(
    request: Request, key: Annotated[str | None, Depends(_KEY_HEADER)] = None
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
