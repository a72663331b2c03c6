"""``/health/live`` and ``/health/ready``: the API process answers; the engine is not stalled.

Liveness says only that this process serves requests: restarting the API
cannot mend a stalled projection, so nothing else fails it. Readiness is the
verdict of :func:`engine.health.readiness` on the process's background status
sample (``ApiContext.sampler``, one collect every ``ops.status_interval_s``
whatever the number of probes): 503 while a projection or the relay is
stalled, or the status cannot be collected, naming each and why.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from engine.api.context import ApiContext
from engine.health import readiness


class Problem(BaseModel):
    """What stops readiness: a projection's name, ``relay`` or ``status``, and why."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    component: str
    reason: str


class ReadinessBody(BaseModel):
    """The readiness verdict, with the problems that stop it (none when ready)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    status: Literal["ready", "not ready"]
    problems: list[Problem]
    sample_age_s: float | None
    """Seconds since the status sample judged was taken; None before the first."""


class Live(BaseModel):
    status: Literal["ok"]


router = APIRouter(tags=["engine"])


@router.get("/health/live", summary="Liveness: the API process answers")
async def health_live() -> Live:
    return Live(status="ok")


@router.get(
    "/health/ready",
    summary="Readiness: no projection and not the relay stalled (from the status sample)",
    response_model=ReadinessBody,
    responses={
        503: {
            "model": ReadinessBody,
            "description": "A projection or the relay is stalled, or the status cannot be "
            "collected: ``problems`` names each and why.",
        }
    },
)
async def health_ready(request: Request) -> JSONResponse:
    context: ApiContext = request.app.state.context
    verdict = readiness(
        context.sampler.latest, interval_s=context.sampler.interval_s, projections=True, relay=True
    )
    return JSONResponse(verdict.body(), status_code=200 if verdict.ready else 503)
