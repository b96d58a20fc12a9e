"""``/graphs``: store, version, validate, read and delete graphs."""

from __future__ import annotations

from typing import Any

import yaml
from litestar import Request, Response, delete, get, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery

from server.api import serialize
from server.api.errors import MalformedBody, query_int
from server.braid import Braid
from server.errors import Problem, ValidationFailed
from server.graph.model import Graph
from server.graph.parse import build_graph, load_document

YAML_TYPES = ("application/yaml", "text/yaml", "application/x-yaml", "text/x-yaml")


async def read_graph(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The graph document of the request body, JSON or YAML by Content-Type."""
    body = await request.body()
    if not body.strip():
        raise MalformedBody(
            "the request body is empty: send the graph as JSON or YAML (Content-Type application/yaml)"
        )
    try:
        return load_document(body, request.content_type[0] or None)
    except ValidationFailed as exc:
        if all(not p.path for p in exc.problems):
            # Not readable at all (syntax, encoding, not a mapping): a bad request, not a bad graph.
            raise MalformedBody(str(exc).removeprefix("invalid graph: ")) from None
        raise


def validate(spec: dict[str, Any], braid: NamedDependency[Braid], name: str | None = None) -> Graph:
    """Build the graph; with ``name`` (from the path) the body's name must match it or be absent.

    It is built on the event loop: CPython 3.11's ``compile()`` (Jinja's templates) is not safe
    beside another thread compiling or importing (python/cpython#106905), so validation stays
    in one thread, bounded by the graph size limits (``MAX_NODES``, ``MAX_EDGES``)."""
    problems: list[Problem] = []
    if name is not None:
        given = spec.get("name")
        if given is None:
            spec = {"name": name, **spec}
        elif given != name:
            problems.append(
                Problem("name", f"the graph is named {given!r} but the URL says {name!r}; make them equal")
            )
    try:
        graph = build_graph(spec, braid.registry, braid.validation)
    except ValidationFailed as exc:
        raise ValidationFailed([*problems, *exc.problems]) from None
    if problems:
        raise ValidationFailed(problems)
    return graph


@post("/graphs", tags=["graphs"], summary="Create a graph (version 1)", status_code=201)
async def create_graph(
    request: Request[Any, Any, Any], braid: NamedDependency[Braid]
) -> Response[dict[str, Any]]:
    spec = await read_graph(request)
    graph = validate(spec, braid)
    record = await braid.store.create_graph(graph.name, spec, graph.description, len(graph.nodes))
    return Response(serialize.graph(record), status_code=201)


@put("/graphs/{name:str}", tags=["graphs"], summary="Create a graph or store a new version of it")
async def put_graph(
    request: Request[Any, Any, Any], braid: NamedDependency[Braid], name: FromPath[str]
) -> Response[dict[str, Any]]:
    spec = await read_graph(request)
    if "name" not in spec:
        spec = {"name": name, **spec}
    graph = validate(spec, braid, name)
    record, created = await braid.store.put_graph(graph.name, spec, graph.description, len(graph.nodes))
    return Response(serialize.graph(record), status_code=201 if created else 200)


@post("/graphs/validate", tags=["graphs"], summary="Validate a graph without storing it", status_code=200)
async def validate_graph(request: Request[Any, Any, Any], braid: NamedDependency[Braid]) -> dict[str, Any]:
    graph = validate(await read_graph(request), braid)
    return {"valid": True, "name": graph.name, "nodes": len(graph.nodes)}


@get("/graphs", tags=["graphs"], summary="List graphs (latest versions) with their last run")
async def list_graphs(braid: NamedDependency[Braid]) -> list[dict[str, Any]]:
    return [serialize.graph_summary(s) for s in await braid.store.list_graphs()]


@get(
    "/graphs/{name:str}", summary="A graph's latest version (or ?version=N); Accept application/yaml for YAML"
)
async def get_graph(
    request: Request[Any, Any, Any],
    braid: NamedDependency[Braid],
    name: FromPath[str],
    version: FromQuery[str | None] = None,
) -> Response[Any]:
    record = await braid.store.get_graph(name, query_int(version, "version", minimum=1))
    wanted = request.accept.best_match(["application/json", *YAML_TYPES], default="application/json")
    if wanted in YAML_TYPES:
        text = yaml.safe_dump(record.spec, sort_keys=False, allow_unicode=True)
        return Response(text, media_type="application/yaml")
    return Response(serialize.graph(record))


@get("/graphs/{name:str}/versions", tags=["graphs"], summary="Every stored version of a graph, newest first")
async def graph_versions(braid: NamedDependency[Braid], name: FromPath[str]) -> list[dict[str, Any]]:
    return [serialize.graph_version(r) for r in await braid.store.graph_versions(name)]


@delete("/graphs/{name:str}", tags=["graphs"], summary="Delete a graph (its runs are kept)", status_code=204)
async def delete_graph(braid: NamedDependency[Braid], name: FromPath[str]) -> None:
    await braid.store.delete_graph(name)


graph_handlers = [
    create_graph,
    put_graph,
    validate_graph,
    list_graphs,
    get_graph,
    graph_versions,
    delete_graph,
]
