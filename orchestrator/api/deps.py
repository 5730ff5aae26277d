"""What route handlers depend on, as short `Annotated` aliases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from orchestrator.analysis.pipeline import Pipeline
from orchestrator.analysis.sessions import SessionStore
from orchestrator.errors import NotReady
from orchestrator.security.output_filter import OutputFilter
from orchestrator.settings import Settings
from orchestrator.wiring import Backends


@dataclass(frozen=True)
class Services:
    """What the route handlers use, built by the lifespan once the backends are loaded."""

    settings: Settings
    backends: Backends
    pipeline: Pipeline
    sessions: SessionStore
    answers: OutputFilter
    """The output filter every answer leaves through (`orchestrator.security.output_filter`)."""


async def get_services(request: Request) -> Services:
    """The app's services (`async`: FastAPI runs a plain function dependency in a worker thread, a hop that costs
    more than this whole lookup)."""
    services = request.app.state.services
    if not isinstance(services, Services):
        raise NotReady("the service is starting or stopping; the backends are not loaded")
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
