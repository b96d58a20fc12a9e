"""Real services the tests talk to: skipped on a laptop without them, never in CI.

CI sets BRAID_REQUIRE_SERVICES=1, which turns a missing service into a failure.
"""

from __future__ import annotations

import os
import socket

import pytest

POSTGRES_URL = os.environ.get("BRAID_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BRAID_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _require(name: str, host: str, port: int) -> None:
    if _reachable(host, port):
        return
    message = f"{name} is not reachable at {host}:{port}"
    if os.environ.get("BRAID_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message} and BRAID_REQUIRE_SERVICES=1: start it (see .ci/run)")
    pytest.skip(message)


def require_postgres() -> str:
    """The test Postgres URL; skips (or fails in CI) when Postgres is down."""
    _require("PostgreSQL", "127.0.0.1", 5432)
    return POSTGRES_URL


def require_redis() -> str:
    """The test Redis URL; skips (or fails in CI) when Redis is down."""
    _require("Redis", "127.0.0.1", 6379)
    return REDIS_URL
