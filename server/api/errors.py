"""The one place where errors become HTTP answers.

Every error answer is JSON ``{"status_code": .., "detail": ..}``; validation errors (422) add
``errors: [{"path", "message"}]``. Braid's own errors map by class; Litestar's HTTP exceptions
(404 for an unknown route, 413 for a body over ``request_max_body_size``, ...) keep their status
and shape; the database or Redis being unreachable (stopped, restarting, the network) is a 503 the
client can retry; anything else is a logged 500 with a generic detail, never a traceback.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.types import ExceptionHandlersMap
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, OperationalError

from server.errors import BraidError, Conflict, NotFound, Problem, Unavailable, ValidationFailed

log = logging.getLogger("braid.api")

DATABASE_UNAVAILABLE = "the database is unavailable; try again shortly"
REDIS_UNAVAILABLE = "Redis is unavailable; try again shortly"
UNAVAILABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03")
"""PostgreSQL's connection errors (class 08) and its shutting down, crashed or starting up."""


class MalformedBody(BraidError):
    """The request body cannot be parsed (bad JSON or YAML, or not an object)."""


def invalid(path: str, message: str, what: str = "request") -> ValidationFailed:
    """A one-problem validation error (a bad query value, a bad field)."""
    return ValidationFailed([Problem(path, message)], what=what)


def query_int(value: str | None, name: str, *, minimum: int, maximum: int | None = None) -> int | None:
    """A whole-number query parameter (None when absent); a bad value is a 422 naming it."""
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise invalid(name, f"must be a whole number, not {value!r}") from None
    if number < minimum or (maximum is not None and number > maximum):
        bounds = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise invalid(name, f"must be {bounds}, not {number}")
    return number


def query_float(value: str | None, name: str, *, minimum: float, maximum: float) -> float | None:
    """A number query parameter (None when absent); a bad value is a 422 naming it."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        raise invalid(name, f"must be a number of seconds, not {value!r}") from None
    if not minimum <= number <= maximum:
        raise invalid(name, f"must be between {minimum:g} and {maximum:g}, not {number:g}")
    return number


def query_bool(value: str | None, name: str) -> bool:
    """A yes/no query parameter: true/false, 1/0, yes/no (absent is false)."""
    if value is None:
        return False
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on", ""):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise invalid(name, f"must be true or false, not {value!r}")


def error_body(status_code: int, detail: str, **extra: Any) -> dict[str, Any]:
    return {"status_code": status_code, "detail": detail, **extra}


def _status(exc: BraidError) -> int:
    if isinstance(exc, ValidationFailed):
        return 422
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Conflict):
        return 409
    if isinstance(exc, MalformedBody):
        return 400
    if isinstance(exc, Unavailable):
        return 503
    return 500


def braid_error(request: Request[Any, Any, Any], exc: BraidError) -> Response[dict[str, Any]]:
    status = _status(exc)
    if status == 500:
        return internal_error(request, exc)
    extra: dict[str, Any] = {}
    if isinstance(exc, ValidationFailed):
        extra["errors"] = [p.as_json() for p in exc.problems]
    return Response(error_body(status, str(exc), **extra), status_code=status)


def internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    if isinstance(exc, HTTPException) and exc.status_code < 500:
        return Response(
            error_body(exc.status_code, exc.detail), status_code=exc.status_code, headers=exc.headers or None
        )
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return Response(
        error_body(500, "Internal server error; the details are in the server's log."), status_code=500
    )


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be reached (rather than that a statement failed)."""
    if isinstance(exc, ConnectionError | socket.gaierror):  # connecting failed (no wrapper)
        return True
    if isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        return True
    if isinstance(exc, DBAPIError):
        sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        return isinstance(sqlstate, str) and sqlstate.startswith(UNAVAILABLE_SQLSTATES)
    return False


def unavailable_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    if not database_unavailable(exc):
        return internal_error(request, exc)
    log.warning(
        "%s %s: the database is unavailable (%s: %s)",
        request.method,
        request.url.path,
        type(exc).__name__,
        exc,
    )
    return Response(error_body(503, DATABASE_UNAVAILABLE), status_code=503)


def redis_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    """Redis out of reach (stopped, restarting, the network) is a 503; any other Redis error a 500."""
    if not isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return internal_error(request, exc)
    log.warning("%s %s: Redis is unavailable (%s)", request.method, request.url.path, exc)
    return Response(error_body(503, REDIS_UNAVAILABLE), status_code=503)


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    BraidError: braid_error,
    DBAPIError: unavailable_error,
    OSError: unavailable_error,
    RedisError: redis_error,
    # The 500 key catches every exception that is not an HTTPException and has no handler of its own.
    500: internal_error,
}
