"""A minimal HTTP/1.1 keep-alive client for load generation.

Why not httpx: on this 2-core machine httpx spends 2 to 7 ms of CPU per
request in the client (its connection pool grows costlier with concurrency),
so the load generator would take the CPU the server under test needs and
measure itself. This client writes a request and reads a ``Content-Length``
(or chunked) answer on persistent connections, like ``wrk`` does: a few
tens of microseconds per request. It speaks only to the local API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any


class HttpError(Exception):
    """The connection failed or the answer was not HTTP/1.1 as expected."""


class HttpPool:
    """Up to ``size`` persistent connections to one host; a request borrows one."""

    def __init__(
        self, host: str, port: int, size: int, headers: dict[str, str] | None = None
    ) -> None:
        self._host = host
        self._port = port
        self._slots = asyncio.Semaphore(size)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._fixed = f"Host: {host}:{port}\r\n{extra}"

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        """(status, body) of one request; ``body`` is sent as JSON when given."""
        payload = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\n{self._fixed}Content-Length: {len(payload)}\r\n"
        if body is not None:
            head += "Content-Type: application/json\r\n"
        request = head.encode() + b"\r\n" + payload
        async with self._slots:
            # A kept-alive connection the server closed meanwhile (uvicorn drops idle ones
            # after 5 s) answers nothing at all: the request never reached the application,
            # so it is sent again once, on a new connection.
            for reused in (bool(self._idle), False):
                reader, writer = await self._connection(fresh=not reused)
                try:
                    writer.write(request)
                    status, content, keep = await _read_response(reader)
                except _Closed:
                    writer.close()
                    if reused:
                        continue
                    raise HttpError(f"{method} {path}: the server closed the connection") from None
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    writer.close()
                    raise HttpError(f"{method} {path}: {exc!r}") from exc
                if keep:
                    self._idle.append((reader, writer))
                else:
                    writer.close()
                return status, content
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def get_json(self, path: str) -> tuple[int, Any]:
        status, content = await self.request("GET", path)
        return status, json.loads(content) if content else None

    async def _connection(
        self, *, fresh: bool
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._idle and not fresh:
            return self._idle.pop()
        try:
            return await asyncio.open_connection(self._host, self._port)
        except OSError as exc:
            raise HttpError(f"cannot connect to {self._host}:{self._port}: {exc}") from exc

    async def close(self) -> None:
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class _Closed(Exception):
    """The connection ended before the first byte of an answer."""


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    try:
        status_line = await reader.readline()
    except ConnectionResetError as exc:
        raise _Closed from exc
    if not status_line:
        raise _Closed
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP answer: {status_line[:80]!r}")
    headers: dict[bytes, bytes] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        content = await _read_chunked(reader)
    else:
        content = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    keep = headers.get(b"connection", b"").lower() != b"close"
    return int(parts[1]), content, keep


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    while size := int((await reader.readline()).split(b";")[0].strip() or b"0", 16):
        chunks.append(await reader.readexactly(size))
        await reader.readline()
    await reader.readline()  # the empty line after the last chunk (no trailers expected)
    return b"".join(chunks)
