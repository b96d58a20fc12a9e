"""Runs: start one (``POST /graphs/{name}/runs``), list, read and cancel them."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated, Any, cast

from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from litestar.exceptions import ClientException
from litestar.params import FromPath, FromQuery, HeaderParameter, QueryParameter
from litestar.types import ASGIApp

from server.api import serialize
from server.api.errors import MalformedBody, invalid, query_bool, query_float, query_int
from server.braid import Braid
from server.errors import NotFound, Problem, ValidationFailed
from server.graph.parse import MAX_DEPTH, json_problems, too_deep
from server.status import RunStatus
from server.store.base import RunRecord

DEFAULT_WAIT_SECONDS = 60.0
MAX_WAIT_SECONDS = 3600.0
RUN_FIELDS = ("input", "version", "idempotency_key")
BODY_TOO_DEEP = f"the request body is nested too deeply (over {MAX_DEPTH} levels)"


async def read_object(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The JSON object of the request body; an empty body is ``{}``."""
    body = await request.body()
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedBody(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise MalformedBody(BODY_TOO_DEEP) from None
    if too_deep(value):
        raise MalformedBody(BODY_TOO_DEEP)
    if not isinstance(value, dict):
        raise MalformedBody(f"the request body must be a JSON object, not {type(value).__name__}")
    return value


def is_run_id(value: str) -> bool:
    """Whether ``value`` is a run id as the store hands them out: a UUIDv7 in canonical form (the
    ``?before=`` cursor compares ids as strings, so an upper-case or braced spelling would not do)."""
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return False
    return parsed.version == 7 and str(parsed) == value


def run_request(body: dict[str, Any], header_key: str | None = None) -> tuple[Any, int | None, str | None]:
    """``{input, version?, idempotency_key?}`` checked field by field; ``header_key`` is the
    ``Idempotency-Key`` header, which the body's ``idempotency_key`` may repeat but not contradict."""
    problems = [
        Problem(key, f"unknown field; expected one of {', '.join(RUN_FIELDS)}")
        for key in body
        if key not in RUN_FIELDS
    ]
    # Python's json reads NaN, Infinity and lone surrogates, which no store or client takes back.
    problems += json_problems(body.get("input"), ("input",))
    version = body.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        problems.append(Problem("version", f"must be a version number (1, 2, ...), not {version!r}"))
    key = body.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 200):
        problems.append(Problem("idempotency_key", "must be a string of 1 to 200 characters"))
    elif isinstance(key, str):
        problems += json_problems(key, ("idempotency_key",))
    if header_key is not None:
        if not 1 <= len(header_key) <= 200:
            problems.append(Problem("Idempotency-Key", "must be 1 to 200 characters"))
        elif key is None:
            key = header_key
        elif isinstance(key, str) and key != header_key:
            problems.append(
                Problem(
                    "idempotency_key",
                    f"differs from the Idempotency-Key header ({header_key!r}); send one or make them equal",
                )
            )
    if problems:
        raise ValidationFailed(problems, what="request")
    return body.get("input", {}), version, key


def _run_streamer() -> Callable[..., Awaitable[Any]]:
    """``server.api.events.stream_run``; 406 when this server cannot stream."""
    try:
        from server.api.events import stream_run
    except ModuleNotFoundError as exc:
        if exc.name != "server.api.events":
            raise
        raise ClientException(
            "this server cannot stream run events; poll GET /runs/{id}", status_code=406
        ) from None
    return stream_run


async def run_answer(
    braid: Braid,
    run: RunRecord,
    status_code: int,
    headers: dict[str, str] | None = None,
    *,
    fresh: bool = False,
) -> Response[Any]:
    """The run with its node executions, then its graph's other nodes as ``pending``; a ``fresh``
    run (as created, before any event) has no execution yet."""
    nodes = [] if fresh else await braid.store.node_executions(run.id)
    try:
        graph_nodes: Iterable[str] = (await braid.graphs.get(run.graph, run.version)).nodes
    except (NotFound, ValidationFailed):  # the graph was deleted, or no longer builds here
        graph_nodes = ()
    return Response(serialize.run(run, nodes, graph_nodes), status_code=status_code, headers=headers)


@post(
    "/graphs/{name:str}/runs",
    tags=["runs"],
    summary="Start a run (202); ?wait=true answers when it ends; ?stream=true streams its events",
)
async def start_run(
    request: Request[Any, Any, Any],
    braid: NamedDependency[Braid],
    name: FromPath[str],
    wait: FromQuery[str | None] = None,
    wait_seconds: Annotated[str | None, QueryParameter(name="timeout")] = None,
    stream: FromQuery[str | None] = None,
    idempotency_key: Annotated[str | None, HeaderParameter(name="Idempotency-Key", required=False)] = None,
) -> ASGIApp:
    waiting = query_bool(wait, "wait")
    seconds = query_float(wait_seconds, "timeout", minimum=0, maximum=MAX_WAIT_SECONDS)
    streaming = (
        query_bool(stream, "stream")
        or request.accept.best_match(["application/json", "text/event-stream"]) == "text/event-stream"
    )
    input, version, key = run_request(await read_object(request), idempotency_key)
    stream_run = _run_streamer() if streaming else None
    # A streamed new run is queued by its stream, once subscribed to the run's events: nothing of
    # the run can be persisted before, so the stream needs no replay from the database.
    run, created = await braid.runs.start(
        name, input, version=version, idempotency_key=key, dispatch=stream_run is None
    )
    headers = None if created else {"Idempotent-Replayed": "true"}
    if stream_run is not None:
        run_id = run.id

        async def dispatch() -> None:
            await braid.runs.dispatch(run_id)

        return cast(
            "ASGIApp", await stream_run(braid, run_id, after=0, dispatch=dispatch if created else None)
        )
    if waiting:
        run = await braid.runs.wait(run.id, DEFAULT_WAIT_SECONDS if seconds is None else seconds)
    status_code = 200 if waiting and run.status.ended else 202
    # A run answered as created (queued, before its first event) has no node execution yet.
    response = await run_answer(braid, run, status_code, headers, fresh=created and not waiting)
    # Litestar serializes its own Response and passes any other ASGI app (the SSE stream) through.
    return cast("ASGIApp", response)


@get(
    "/runs", tags=["runs"], summary="Runs newest first: ?graph=, ?status=, ?limit= (1..500), ?before=<cursor>"
)
async def list_runs(
    braid: NamedDependency[Braid],
    graph: FromQuery[str | None] = None,
    status: FromQuery[str | None] = None,
    limit: FromQuery[str | None] = None,
    before: FromQuery[str | None] = None,
) -> dict[str, Any]:
    wanted: RunStatus | None = None
    if status:
        try:
            wanted = RunStatus(status)
        except ValueError:
            raise invalid("status", f"must be one of {', '.join(RunStatus)}, not {status!r}") from None
    count = query_int(limit, "limit", minimum=1, maximum=500) or 50
    if before and not is_run_id(before):
        raise invalid("before", f"must be the `next` cursor of a previous page (a run id), not {before!r}")
    runs, cursor = await braid.store.list_runs(
        graph=graph or None, status=wanted, limit=count, before=before or None
    )
    return {"items": [serialize.run_summary(r) for r in runs], "next": cursor}


@get("/runs/{run_id:str}", tags=["runs"], summary="A run with its node executions")
async def get_run(braid: NamedDependency[Braid], run_id: FromPath[str]) -> Response[Any]:
    return await run_answer(braid, await braid.store.get_run(run_id), 200)


@post(
    "/runs/{run_id:str}/cancel",
    tags=["runs"],
    summary="Cancel a queued or running run (409 if it already ended)",
    status_code=202,
)
async def cancel_run(braid: NamedDependency[Braid], run_id: FromPath[str]) -> Response[Any]:
    return await run_answer(braid, await braid.runs.cancel(run_id), 202)


run_handlers = [start_run, list_runs, get_run, cancel_run]
