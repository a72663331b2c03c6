"""The live page at ``GET /``: what ``GET /status`` says, for a person glancing at a screen.

One static file (``live.html``: HTML, CSS, JS and SVG inline), no build step
and nothing fetched from anywhere but this API: the machines that run the
engine often have no internet, and a page that needs a CDN would be blank
exactly when someone looks at it during an incident. The Content-Security-Policy
sent with it holds the page to that (it may only connect back to its origin).

The server keeps no history for it. The page polls ``GET /status`` every 2 s
and keeps the lag it saw in its own memory for the charts (the last 5 minutes,
since it was opened; a reload starts afresh), so the engine stores nothing per
viewer and the page costs one ``/status`` request per viewer every 2 s, which
answers from the status sample the API takes in the background (one collect
per sample however many pages are open). When an API key is configured, the
page sends the reader key it is given (``/?key=...`` or its key field, kept in
the tab's sessionStorage).
"""

from __future__ import annotations

import html
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

# Inline script and style only, connections back to this origin only, images from data: URLs.
_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_HEADERS = {"Content-Security-Policy": _POLICY, "Cache-Control": "no-cache"}


def install_page(app: FastAPI) -> None:
    """Serve the live page at ``/`` (left out of the OpenAPI document: it is not an API)."""
    page = files("engine.api").joinpath("live.html").read_text(encoding="utf-8")
    page = page.replace("__TITLE__", html.escape(app.title))

    @app.get("/", include_in_schema=False)
    async def live_page() -> HTMLResponse:
        return HTMLResponse(page, headers=_HEADERS)
