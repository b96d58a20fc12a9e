"""``GET /health``: is this process able to serve? 503 when the database or the queue is down."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from litestar import Response, get
from litestar.di import NamedDependency
from litestar.params import FromPath

from server.braid import Braid

log = logging.getLogger("braid.api")

PING_SECONDS = 3.0


async def _ping(name: FromPath[str], ping: Callable[[], Awaitable[bool]]) -> bool:
    try:
        with anyio.fail_after(PING_SECONDS):
            return await ping()
    except Exception as exc:  # a health check reports a failure, it never raises one
        log.warning("health: %s ping failed: %s", name, exc)
        return False


@get("/health", tags=["health"], summary="Health of this process and its backing services")
async def health(braid: NamedDependency[Braid]) -> Response[dict[str, Any]]:
    database = await _ping("database", braid.store.ping)
    queue = await _ping("queue", braid.queue.ping)
    healthy = database and queue
    body = {
        "status": "ok" if healthy else "degraded",
        "database": "ok" if database else "down",
        "queue": "ok" if queue else "down",
        "mode": braid.mode,
        "model": "mock" if braid.settings.use_mock_model else "configured",
    }
    return Response(body, status_code=200 if healthy else 503)


health_handlers = [health]
