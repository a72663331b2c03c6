"""The ``X-Correlation-ID`` of each request: read (or made), bound, and sent back.

A client that sends a UUID in ``X-Correlation-ID`` finds it as the
``correlation_id`` of the events its command recorded, and in every log line
about them, from the API to the daemon (:mod:`engine.correlation`). A request
without one, or with one that is not a UUID, gets a new one: the answer's
``X-Correlation-ID`` header says which, so it can be followed all the same.

Pure ASGI, like the body limit: a header read and a header added, on every
request, must cost next to nothing.
"""

from __future__ import annotations

from uuid import uuid4

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import correlation

_HEADER = correlation.HEADER.lower().encode()


class CorrelationId:
    """Binds each request's correlation id for its handling and echoes it in the answer."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        sent = next((v for k, v in scope.get("headers", ()) if k == _HEADER), None)
        correlation_id = correlation.parse(sent) or uuid4()
        echoed = (_HEADER, str(correlation_id).encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), echoed]
            await send(message)

        with correlation.bound(correlation_id):
            await self._app(scope, receive, send_with_id)
