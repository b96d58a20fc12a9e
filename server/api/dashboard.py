"""The HTMX dashboard: runs (``/``), one run (``/ui/runs/{id}``), graphs (``/ui/graphs`` and
``/ui/graphs/{name}``).

Pages are Jinja2 templates (``web/templates``) made of ``_partial.html`` fragments. The live
pages hold an htmx SSE connection to ``/ui/feed`` or ``/ui/runs/{id}/feed``: the same streams as
``GET /events`` and ``GET /runs/{id}/events`` (same event names and ids, same resume rules), whose
data is the page's own fragments re-rendered with ``hx-swap-oob``, so a message updates every
place it concerns. Fragments show the store's current state, which makes replaying them harmless;
only streamed LLM text is appended, and that never repeats: a page connects with ``?after=`` its
own last event, and a reconnecting client resumes from the last id it saw.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import anyio
import yaml
from litestar import MediaType, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, FromQuery, HeaderParameter
from litestar.static_files import create_static_files_router
from markupsafe import Markup
from sse_starlette import EventSourceResponse, ServerSentEvent

from server.api.events import Frames, _produce_feed, _produce_run, _sse, last_gid
from server.braid import Braid
from server.errors import NotFound, Problem, ValidationFailed
from server.events import Event
from server.graph.model import Graph
from server.graph.parse import MAX_DEPTH, json_problems, too_deep
from server.status import EventType, RunStatus
from server.store.base import RunRecord
from server.web import diagram
from server.web.views import (
    NodeInputs,
    NodeSummary,
    input_skeleton,
    live_history_needed,
    live_text,
    live_update,
    node_inputs,
    render,
    summarize,
    timeline,
)

STATIC = Path(__file__).resolve().parents[2] / "web" / "static"
RUN_EVENTS = (EventType.WORKFLOW_STARTED, EventType.WORKFLOW_FINISHED)

LastEventId = Annotated[str | None, HeaderParameter(name="Last-Event-ID", required=False)]


def html(body: str, status_code: int = 200, headers: Mapping[str, str] | None = None) -> Response[str]:
    return Response(body, media_type=MediaType.HTML, status_code=status_code, headers=dict(headers or {}))


def page(braid: Braid, template: str, status_code: int = 200, **context: Any) -> Response[str]:
    return html(render(template, braid=braid, oob=False, **context), status_code)


def not_found(braid: Braid, message: str) -> Response[str]:
    return page(braid, "404.html", 404, message=message)


def is_htmx(request: Request[Any, Any, Any]) -> bool:
    return request.headers.get("HX-Request") == "true"


def redirect(request: Request[Any, Any, Any], url: str) -> Response[str]:
    """Go to ``url``: by ``HX-Redirect`` for htmx, by a 303 for a plain form."""
    if is_htmx(request):
        return html("", headers={"HX-Redirect": url})
    return html("", 303, {"Location": url})


def cursor(*values: str | None) -> int:
    """The client's position in a stream: the highest of ``?after=`` and ``Last-Event-ID`` (a
    browser reconnecting by itself sends a newer Last-Event-ID with the page's original URL)."""
    best = 0
    for value in values:
        if value and value.strip().isdigit():
            best = max(best, int(value.strip()))
    return best


def status_filter(value: str | None) -> RunStatus | None:
    try:
        return RunStatus(value) if value else None
    except ValueError:
        return None


# --- runs ----------------------------------------------------------------------------------------


async def runs_table(braid: Braid, graph: str | None, status: RunStatus | None) -> list[RunRecord]:
    runs, _ = await braid.store.list_runs(graph=graph or None, status=status, limit=50)
    return runs


@get("/", include_in_schema=False)
async def runs_page(
    braid: NamedDependency[Braid], graph: FromQuery[str | None] = None, status: FromQuery[str | None] = None
) -> Response[str]:
    wanted = status_filter(status)
    after = await last_gid(braid.store)  # before the snapshot, so the feed misses nothing after it
    runs = await runs_table(braid, graph, wanted)
    graphs = [g.name for g in await braid.store.list_graphs()]
    return page(
        braid,
        "runs.html",
        runs=runs,
        graphs=graphs,
        graph=graph or "",
        status=wanted.value if wanted else "",
        after=after,
    )


@get("/ui/feed", include_in_schema=False)
async def runs_feed(
    braid: NamedDependency[Braid],
    after: FromQuery[str | None] = None,
    graph: FromQuery[str | None] = None,
    status: FromQuery[str | None] = None,
    last_event_id: LastEventId = None,
) -> EventSourceResponse:
    """The runs table, re-rendered whenever a run starts or finishes (ids of ``GET /events``)."""
    wanted = status_filter(status)

    async def message(events: list[Event]) -> ServerSentEvent | None:
        return await runs_message(braid, graph, wanted, events)

    async def source(out: Frames) -> None:
        await _produce_feed(braid, cursor(after, last_event_id), 0, graph or None, False, out)

    return html_stream(source, message)


async def runs_message(
    braid: Braid, graph: str | None, status: RunStatus | None, events: list[Event]
) -> ServerSentEvent | None:
    """One SSE message for a batch of feed events: the runs table, if a run started or finished."""
    changes = [e for e in events if e.type in RUN_EVENTS]
    if not changes:
        return None
    runs = await runs_table(braid, graph, status)
    body = render("_runs_table.html", braid=braid, runs=runs, oob=True)
    return ServerSentEvent(body, event=str(changes[-1].type), id=str(events[-1].gid))


# --- one run ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class RunView:
    run: RunRecord
    graph: Graph | None
    plan: diagram.Layout | None
    nodes: dict[str, NodeSummary]
    lanes: list[Any]

    def node_attrs(self, node: str, oob: bool = False) -> dict[str, str]:
        attrs = {
            "hx-get": f"/ui/runs/{self.run.id}/nodes/{node}",
            "hx-target": "#node-panel",
            "hx-swap": "outerHTML",
            "tabindex": "0",
        }
        if oob:
            attrs["hx-swap-oob"] = "true"
        return attrs

    def diagram(self) -> Markup:
        if self.graph is None:
            return Markup("")
        attrs = {node: self.node_attrs(node) for node in self.graph.nodes}
        views = {node: summary.view for node, summary in self.nodes.items()}
        return diagram.render(self.graph, views, attrs, self.plan)

    def inputs(self, node: str, events: list[Event]) -> NodeInputs:
        """What ``node``'s latest attempt was given and sent, for its panel."""
        return node_inputs(self.run, self.graph, self.nodes, node, events)

    def node_fragments(self, nodes: list[str]) -> Markup:
        """The diagram's nodes as out-of-band swaps (wrapped in ``<svg>`` so they parse as SVG)."""
        if self.plan is None:
            return Markup("")
        parts = [
            diagram.node_svg(self.plan.boxes[n], self.nodes[n].view, self.node_attrs(n, oob=True))
            for n in nodes
            if n in self.plan.boxes and n in self.nodes
        ]
        return Markup('<svg class="oob">{}</svg>').format(Markup("").join(parts)) if parts else Markup("")


async def load_run(braid: Braid, run_id: str) -> RunView:
    run = await braid.store.get_run(run_id)
    try:
        graph: Graph | None = await braid.graphs.get(run.graph, run.version)
    except (NotFound, ValidationFailed):
        graph = None  # deleted since: the run is still shown, without its diagram
    executions = await braid.store.node_executions(run_id)
    return RunView(
        run=run,
        graph=graph,
        plan=diagram.layout(graph) if graph is not None else None,
        nodes=summarize(graph, executions),
        lanes=timeline(run, executions),
    )


@get("/ui/runs/{run_id:str}", include_in_schema=False)
async def run_page(
    braid: NamedDependency[Braid], run_id: FromPath[str], node: FromQuery[str | None] = None
) -> Response[str]:
    try:
        view = await load_run(braid, run_id)
    except NotFound:
        return not_found(braid, f"There is no run {run_id}.")
    # The streamed text up to the run's last event as read above: the feed sends what follows.
    events = [e for e in await braid.store.events(run_id) if e.seq <= view.run.last_seq]
    selected = view.nodes.get(node) if node else None
    inputs = view.inputs(selected.id, events) if selected is not None else None
    return page(
        braid, "run.html", view=view, run=view.run, text=live_text(events), selected=selected, inputs=inputs
    )


@get("/ui/runs/{run_id:str}/nodes/{node:str}", include_in_schema=False)
async def node_panel(
    braid: NamedDependency[Braid], run_id: FromPath[str], node: FromPath[str]
) -> Response[str]:
    try:
        view = await load_run(braid, run_id)
    except NotFound:
        return not_found(braid, f"There is no run {run_id}.")
    if node not in view.nodes:
        return not_found(braid, f"Run {run_id} has no node {node}.")
    selected = view.nodes[node]
    events = [e for e in await braid.store.events(run_id) if e.seq <= view.run.last_seq]
    inputs = view.inputs(node, events)
    context = {"braid": braid, "view": view, "run": view.run, "selected": selected, "inputs": inputs}
    return html(render("_node_panel.html", **context, oob=False))


@get("/ui/runs/{run_id:str}/feed", include_in_schema=False)
async def run_feed(
    braid: NamedDependency[Braid],
    run_id: FromPath[str],
    after: FromQuery[str | None] = None,
    last_event_id: LastEventId = None,
) -> EventSourceResponse:
    """The run's events (ids of ``GET /runs/{id}/events``) as the fragments they change."""
    try:
        run = await braid.store.get_run(run_id)
    except NotFound as exc:
        raise NotFoundException(str(exc)) from None
    start = cursor(after, last_event_id)
    if run.status.ended:
        # Send the end again so the page closes its stream instead of reconnecting forever.
        start = min(start, max(run.last_seq - 1, 0))

    async def message(events: list[Event]) -> ServerSentEvent | None:
        return await run_message(braid, run_id, events)

    async def source(out: Frames) -> None:
        await _produce_run(braid, run_id, start, out)

    return html_stream(source, message)


async def run_message(braid: Braid, run_id: str, events: list[Event]) -> ServerSentEvent:
    """One SSE message for a batch of a run's events: the fragments they change."""
    # Streamed text: a node that (re)started gets its boxes re-rendered (one per map item, which
    # may need the run's earlier events); one that goes on streaming gets its text appended.
    first = events[0].seq if events else 1
    earlier = await braid.store.events(run_id, 0, first - 1) if live_history_needed(events) else []
    parts: list[str] = [live_update(events, earlier)]
    lifecycle = [e for e in events if e.type is not EventType.NODE_DELTA]
    if lifecycle:
        view = await load_run(braid, run_id)
        if any(e.type in RUN_EVENTS for e in lifecycle):
            changed = list(view.nodes)
        else:
            changed = list(dict.fromkeys(str(e.data.get("node")) for e in lifecycle))
        context = {"braid": braid, "view": view, "run": view.run, "changed": changed, "oob": True}
        parts.append(render("_run_update.html", **context))
    name = (lifecycle or events)[-1].type
    return ServerSentEvent("".join(parts), event=str(name), id=str(events[-1].seq))


def html_stream(
    source: Callable[[Frames], Awaitable[None]],
    message: Callable[[list[Event]], Awaitable[ServerSentEvent | None]],
) -> EventSourceResponse:
    """An SSE response carrying ``source``'s events (the JSON streams of ``server.api.events``)
    as HTML: each batch of events waiting together becomes one message."""

    async def produce(out: Frames) -> None:
        send, receive = anyio.create_memory_object_stream[ServerSentEvent](64)

        async def pump() -> None:
            async with send:
                await source(send)

        async with anyio.create_task_group() as tg, receive:
            tg.start_soon(pump)
            async for frame in receive:
                frames = [frame]
                while True:
                    try:
                        frames.append(receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                events = [_event(f) for f in frames]
                answer = await message(events)
                if answer is not None:
                    await out.send(answer)

    return _sse(produce)


def _event(frame: ServerSentEvent) -> Event:
    obj = json.loads(str(frame.data))
    gid = obj.pop("gid", None)
    return Event.from_json(obj, gid=gid)


@post("/ui/runs/{run_id:str}/rerun", include_in_schema=False)
async def rerun(
    request: Request[Any, Any, Any], braid: NamedDependency[Braid], run_id: FromPath[str]
) -> Response[str]:
    """Start a new run of the same graph version with the same input, and go to it."""
    try:
        old = await braid.store.get_run(run_id)
        run, _ = await braid.runs.start(old.graph, old.input, version=old.version)
    except NotFound as exc:
        return not_found(braid, str(exc))
    except ValidationFailed as exc:
        return html(render("_problems.html", problems=exc.problems), 422)
    return redirect(request, f"/ui/runs/{run.id}")


# --- graphs ------------------------------------------------------------------------------------------


@get("/ui/graphs", include_in_schema=False)
async def graphs_page(braid: NamedDependency[Braid]) -> Response[str]:
    return page(braid, "graphs.html", graphs=await braid.store.list_graphs())


async def graph_context(braid: Braid, name: str, version: int | None) -> dict[str, Any]:
    record = await braid.store.get_graph(name, version)
    versions = await braid.store.graph_versions(name)
    runs, _ = await braid.store.list_runs(graph=name, limit=10)
    try:
        graph: Graph | None = await braid.graphs.get(record.name, record.version)
    except ValidationFailed:
        graph = None
    return {
        "record": record,
        "graph": graph,
        "svg": diagram.render(graph) if graph is not None else Markup(""),
        "yaml": yaml.safe_dump(record.spec, sort_keys=False, allow_unicode=True),
        "versions": versions,
        "runs": runs,
        "latest": versions[0].version if versions else record.version,
    }


@get("/ui/graphs/{name:str}", include_in_schema=False)
async def graph_page(
    braid: NamedDependency[Braid], name: FromPath[str], version: FromQuery[int | None] = None
) -> Response[str]:
    try:
        context = await graph_context(braid, name, version)
    except NotFound:
        what = f"version {version} of graph {name}" if version else f"graph {name}"
        return not_found(braid, f"There is no {what}.")
    graph: Graph | None = context["graph"]
    skeleton = input_skeleton(graph.input_schema if graph else None)
    return page(braid, "graph.html", **context, form_input=skeleton, problems=[])


def read_input(raw: str) -> tuple[Any, list[Problem]]:
    """The form's JSON input, or the problems with it (NaN and lone surrogates included)."""
    too_deeply = [Problem("input", f"is nested too deeply (over {MAX_DEPTH - 1} levels)")]
    try:
        value = json.loads(raw)
    except ValueError as exc:
        return None, [Problem("input", f"is not valid JSON: {exc}")]
    except RecursionError:
        return None, too_deeply
    # The API counts the levels of the whole body, the input one level down: the same limit here.
    if too_deep(value, MAX_DEPTH - 1):
        return None, too_deeply
    return value, json_problems(value, ("input",))


@post("/ui/graphs/{name:str}/runs", include_in_schema=False)
async def start_run(
    request: Request[Any, Any, Any], braid: NamedDependency[Braid], name: FromPath[str]
) -> Response[str]:
    """Start a run from the graph page's form; the input's problems come back in the form."""
    form = await request.form()
    raw = str(form.get("input") or "").strip() or "{}"
    raw_version = str(form.get("version") or "").strip()
    version = int(raw_version) if raw_version.isdigit() else None
    value, problems = read_input(raw)
    if not problems:
        try:
            run, _ = await braid.runs.start(name, value, version=version)
        except NotFound:
            return not_found(braid, f"There is no graph {name}.")
        except ValidationFailed as exc:
            problems = list(exc.problems)
        else:
            return redirect(request, f"/ui/runs/{run.id}")
    if is_htmx(request):
        return html(
            render("_start_form.html", name=name, version=version, form_input=raw, problems=problems), 422
        )
    try:
        context = await graph_context(braid, name, version)
    except NotFound:
        return not_found(braid, f"There is no graph {name}.")
    return page(braid, "graph.html", 422, **context, form_input=raw, problems=problems)


static_router = create_static_files_router(path="/static", directories=[STATIC], include_in_schema=False)
"""``/static``: the stylesheet, the dashboard's script and the vendored htmx (``make static``)."""

dashboard_handlers: list[Any] = [
    runs_page,
    runs_feed,
    run_page,
    node_panel,
    run_feed,
    rerun,
    graphs_page,
    graph_page,
    start_run,
]
"""The dashboard's route handlers, for ``create_app`` (with ``static_router``)."""
