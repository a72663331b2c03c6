"""Building the FastAPI application: the engine's part and the application's routers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request

from engine.api.context import ApiContext, open_api_context
from engine.api.correlation import CorrelationId
from engine.api.errors import install_error_handlers
from engine.api.health import router as health_router
from engine.api.limits import BodyLimit
from engine.api.metrics import install_metrics
from engine.api.openapi import error_responses, install_openapi
from engine.api.page import install_page
from engine.api.security import READER
from engine.application import Application
from engine.settings import Settings
from engine.status import EngineStatus, collect_status


def _version() -> str:
    try:
        return version("cqrs-projection-engine")
    except PackageNotFoundError:
        return "0+unknown"


def create_app(settings: Settings, application: Application) -> FastAPI:
    """The HTTP API of ``application``; connections open when the server starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_api_context(settings, application) as context:
            app.state.context = context
            yield

    app = FastAPI(
        title=f"{application.name} — CQRS projection engine",
        version=_version(),
        description="Commands go to PostgreSQL and on through Kafka; queries read the "
        "projections (PostgreSQL views, Redis, Elasticsearch). Every command answers with a "
        "consistency_token: pass it to a query to read your own write.",
        lifespan=lifespan,
        # Operation ids are the endpoints' function names: stable, and what links name.
        generate_unique_id_function=lambda route: route.name,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.api.max_body_bytes)
    install_metrics(app)  # after the other middleware: it times theirs too
    # Outermost: even a refused request answers with its correlation id.
    app.add_middleware(CorrelationId)

    @app.get("/health", tags=["engine"], summary="Liveness: the API process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/status",
        tags=["engine"],
        summary="Per projection: position, lag, dead letters, last error; the outbox",
        dependencies=[READER],
        responses=error_responses(503),
    )
    async def status(request: Request) -> EngineStatus:
        context: ApiContext = request.app.state.context
        # The background sample while fresh: many open pages cost one collect per interval.
        sample = await context.sampler.current(max_age_s=settings.ops.status_interval_s)
        if sample.status is not None:
            return sample.status
        # It failed: collect here, so the answer is the service's error, mapped as usual.
        return await collect_status(settings, application, context.reads)

    app.include_router(health_router)
    if application.api is not None:
        app.include_router(application.api())
    install_page(app)
    install_openapi(app, settings)
    return app
