"""API keys: writers may send commands (and read), readers may only read. Off when unset."""

from __future__ import annotations

import secrets

from fastapi import Depends, HTTPException, status
from fastapi.security import APIKeyHeader
from pydantic import SecretStr
from starlette.requests import HTTPConnection

# One header, two schemes in the OpenAPI document, so that it says which key an
# operation needs (engine.api.openapi keeps a scheme only when its key is set).
WRITER_SCHEME = "WriterKey"
READER_SCHEME = "ReaderKey"


def _matches(given: str | None, *keys: SecretStr | None) -> bool:
    # compare_digest on every configured key: the time taken does not tell which matched.
    results = [
        secrets.compare_digest((given or "").encode(), key.get_secret_value().encode())
        for key in keys
        if key is not None
    ]
    return any(results)


class _KeyCheck(APIKeyHeader):
    """The ``X-API-Key`` header checked against the configured keys, as one dependency.

    An ``APIKeyHeader`` (so the OpenAPI document declares the scheme) whose call
    does the check itself: one dependency per request instead of a check that
    depends on the header's extraction (FastAPI resolves each level separately).
    """

    def __init__(self, scheme: str, description: str, refusal: str, *, writer: bool) -> None:
        super().__init__(
            name="X-API-Key", scheme_name=scheme, description=description, auto_error=False
        )
        self._refusal = refusal
        self._writer = writer

    async def __call__(self, request: HTTPConnection) -> str | None:
        api = request.app.state.settings.api
        key = request.headers.get(self.model.name)
        if self._writer:
            if api.writer_key is not None and not _matches(key, api.writer_key):
                raise HTTPException(status.HTTP_401_UNAUTHORIZED, self._refusal)
        elif api.reader_key is not None and not _matches(key, api.reader_key, api.writer_key):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, self._refusal)
        return key


require_writer = _KeyCheck(
    WRITER_SCHEME,
    "The writer key (ENGINE_API__WRITER_KEY): commands, and queries too.",
    "commands need the writer API key in the X-API-Key header",
    writer=True,
)
require_reader = _KeyCheck(
    READER_SCHEME,
    "The reader key (ENGINE_API__READER_KEY), or the writer key: queries.",
    "queries need the reader (or writer) API key in the X-API-Key header",
    writer=False,
)


# Route dependencies: ``@router.post(..., dependencies=[WRITER])``.
WRITER = Depends(require_writer)
READER = Depends(require_reader)
