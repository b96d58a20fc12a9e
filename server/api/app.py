"""The Litestar application: the HTTP API over one ``Braid`` (opened by the app's lifespan)."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import (
    JsonRenderPlugin,
    ScalarRenderPlugin,
    SwaggerRenderPlugin,
    YamlRenderPlugin,
)
from litestar.types import ControllerRouterHandler

from server.api.errors import EXCEPTION_HANDLERS
from server.api.graphs import graph_handlers
from server.api.health import health_handlers
from server.api.runs import run_handlers
from server.braid import Braid, open_braid
from server.config import Settings, check_folders

QUIET_LOGGERS = ("httpx", "httpx2", "httpcore")


def provide_braid(state: State) -> Braid:
    braid: Braid | None = state.get("braid")
    if braid is None:
        raise RuntimeError("the Braid is not open: was the app started without its lifespan?")
    return braid


def _event_handlers() -> list[ControllerRouterHandler]:
    # The SSE endpoints live in server/api/events.py; the app works without them.
    try:
        from server.api.events import event_handlers, quiet_stalled_clients
    except ModuleNotFoundError as exc:
        if exc.name != "server.api.events":
            raise
        return []
    quiet_stalled_clients()
    return list(event_handlers)


def _dashboard_handlers() -> list[ControllerRouterHandler]:
    # The HTMX dashboard (server/api/dashboard.py) and its static files.
    from server.api.dashboard import dashboard_handlers, static_router

    return [*dashboard_handlers, static_router]


def create_app(settings: Settings | None = None, *, workers: bool | None = None) -> Litestar:
    """The API application. ``workers`` (default: in embedded mode) runs the runner in-process."""
    if settings is None:
        settings = Settings.from_env()
        check_folders()
    # The HTTP clients under openai and the http agent log every request at INFO: one line per
    # LLM call would drown Braid's own log.
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncGenerator[None]:
        async with open_braid(settings, workers=workers) as braid:
            app.state.braid = braid
            try:
                yield
            finally:
                app.state.braid = None

    handlers: list[Any] = [*graph_handlers, *run_handlers, *health_handlers, *_event_handlers()]
    handlers += _dashboard_handlers()
    return Litestar(
        route_handlers=handlers,
        lifespan=[lifespan],
        dependencies={"braid": Provide(provide_braid, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=settings.max_body_bytes,
        state=State({"settings": settings, "braid": None}),
        openapi_config=OpenAPIConfig(
            title="Braid",
            version="0.1.0",
            description="Graphs of AI agents, stored and run by API, watched live over SSE.",
            path="/schema",
            render_plugins=[
                SwaggerRenderPlugin(path="/swagger"),
                ScalarRenderPlugin(path="/scalar"),
                JsonRenderPlugin(path="/openapi.json"),
                YamlRenderPlugin(path="/openapi.yaml"),
            ],
        ),
    )
