"""What the dashboard shows, built from the store's records: one run's nodes, timeline and live
token text, and the Jinja2 environment (with its filters) the pages and fragments render with."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from server.engine.records import NodeExecution, Usage
from server.errors import ExpressionError
from server.events import Event, utcnow
from server.graph.model import Graph
from server.status import EventType, NodeStatus, RunStatus
from server.store.base import RunRecord
from server.web import diagram

TEMPLATES = Path(__file__).resolve().parents[2] / "web" / "templates"


@dataclass(slots=True)
class NodeSummary:
    """One node of a run as the dashboard shows it: its latest execution and how many it had."""

    id: str
    kind: str
    status: NodeStatus = NodeStatus.PENDING
    attempts: int = 0
    iterations: int = 0
    items: int = 0
    output: Any = None
    error: str | None = None
    duration_ms: int | None = None
    usage: Usage = field(default_factory=dict[str, int])
    executions: list[NodeExecution] = field(default_factory=list[NodeExecution])

    @property
    def note(self) -> str:
        parts: list[str] = []
        if self.iterations > 1:
            parts.append(f"{self.iterations} iterations")
        if self.attempts > 1:
            parts.append(f"{self.attempts} tries")
        if self.items:
            parts.append(f"{self.items} items")
        return " · ".join(parts)

    @property
    def view(self) -> diagram.NodeView:
        return diagram.NodeView(self.status, self.note)


def summarize(graph: Graph | None, executions: Iterable[NodeExecution]) -> dict[str, NodeSummary]:
    """Every node of the graph (in declaration order) with the state of its latest execution."""
    nodes: dict[str, NodeSummary] = {}
    if graph is not None:
        for node_id, node in graph.nodes.items():
            nodes[node_id] = NodeSummary(node_id, node.agent.name)
    for execution in executions:
        summary = nodes.setdefault(execution.node, NodeSummary(execution.node, "?"))
        summary.executions.append(execution)
    for summary in nodes.values():
        whole = [e for e in summary.executions if e.index is None]
        items = [e for e in summary.executions if e.index is not None]
        if not summary.executions:
            continue
        summary.iterations = max(e.iteration for e in summary.executions) + 1
        latest_iteration = summary.iterations - 1
        if whole:
            last = max(whole, key=lambda e: (e.iteration, e.started_at or utcnow()))
            summary.status = last.status
            summary.attempts = last.attempts
            summary.output, summary.error = last.output, last.error
            summary.duration_ms = last.duration_ms
        current_items = [e for e in items if e.iteration == latest_iteration]
        summary.items = len(current_items)
        if not whole and current_items:
            statuses = {e.status for e in current_items}
            summary.status = next(
                (s for s in (NodeStatus.FAILED, NodeStatus.RETRYING, NodeStatus.RUNNING) if s in statuses),
                NodeStatus.RUNNING if not all(s.ended for s in statuses) else NodeStatus.SUCCEEDED,
            )
        for execution in summary.executions:
            for key, value in (execution.usage or {}).items():
                summary.usage[key] = summary.usage.get(key, 0) + int(value)
    return nodes


@dataclass(frozen=True, slots=True)
class Bar:
    execution: NodeExecution
    left: float
    width: float
    label: str


@dataclass(frozen=True, slots=True)
class Lane:
    label: str
    node: str
    bars: list[Bar]


def timeline(run: RunRecord, executions: list[NodeExecution], now: datetime | None = None) -> list[Lane]:
    """A Gantt chart: one lane per node (and per map item), one bar per execution (loop
    iterations side by side), positioned in percent of the run's duration so far."""
    now = now or utcnow()
    started = [e.started_at for e in executions if e.started_at is not None]
    if not started:
        return []
    origin = min([run.started_at, *started] if run.started_at else started)
    end = run.finished_at or max([now, *(e.finished_at for e in executions if e.finished_at)])
    span = max((end - origin).total_seconds(), 0.001)
    lanes: dict[tuple[str, int | None], Lane] = {}
    for execution in executions:
        if execution.started_at is None:
            continue
        key = (execution.node, execution.index)
        if key not in lanes:
            label = execution.node if execution.index is None else f"{execution.node}[{execution.index}]"
            lanes[key] = Lane(label, execution.node, [])
        finish = execution.finished_at or end
        left = (execution.started_at - origin).total_seconds() / span * 100
        width = max((finish - execution.started_at).total_seconds() / span * 100, 0.6)
        parts = [f"#{execution.iteration + 1}"] if execution.iteration else []
        if execution.attempts > 1:
            parts.append(f"{execution.attempts} tries")
        width = min(width, 100 - left)
        lanes[key].bars.append(Bar(execution, round(left, 2), round(width, 2), " ".join(parts)))
    return list(lanes.values())


@dataclass(slots=True)
class LiveBox:
    """The text one execution streamed since its latest start: a node's, or one map item's
    (``index``). A retry or a loop's next iteration starts it afresh."""

    node: str
    index: int | None = None
    iteration: int = 0
    attempt: int = 1
    text: str = ""

    @property
    def id(self) -> str:
        """The ``<pre>``'s id (the dot cannot be in a node id, so an item's never clashes)."""
        return box_id(self.node, self.index)

    @property
    def label(self) -> str:
        return self.node if self.index is None else f"{self.node}[{self.index}]"

    @property
    def note(self) -> str:
        parts: list[str] = []
        if self.iteration:
            parts.append(f"iteration {self.iteration + 1}")
        if self.attempt > 1:
            parts.append(f"attempt {self.attempt}")
        return " · ".join(parts)


def box_id(node: str, index: int | None) -> str:
    return f"tokens-{node}" if index is None else f"tokens-{node}.{index}"


def _index(event: Event) -> int | None:
    index = event.data.get("index")
    return index if isinstance(index, int) else None


def live_text(events: Iterable[Event]) -> dict[str, list[LiveBox]]:
    """Each node's streamed text (what ``node.delta`` events carried), one box per map item,
    each since its latest start. A node's start (``index`` none: its retry, its next loop
    iteration, or a map's start) clears all its boxes; an item's start clears that item's."""
    boxes: dict[str, dict[int | None, LiveBox]] = {}
    for event in events:
        node = event.data.get("node")
        if not isinstance(node, str):
            continue
        index = _index(event)
        if event.type is EventType.NODE_STARTED:
            iteration, attempt = event.data.get("iteration"), event.data.get("attempt")
            box = LiveBox(
                node,
                index,
                iteration if isinstance(iteration, int) else 0,
                attempt if isinstance(attempt, int) else 1,
            )
            if index is None:
                boxes[node] = {None: box}
            else:
                boxes.setdefault(node, {})[index] = box
        elif event.type is EventType.NODE_DELTA:
            mine = boxes.setdefault(node, {})
            box = mine.get(index) or mine.setdefault(index, LiveBox(node, index))
            box.text += str(event.data.get("delta", ""))
    return {
        node: sorted(mine.values(), key=lambda b: -1 if b.index is None else b.index)
        for node, mine in boxes.items()
    }


def live_history_needed(events: Sequence[Event]) -> bool:
    """Whether ``live_update`` needs the run's earlier events for this batch: when a map item
    starts in it without its node's start before (the node's other items have text so far)."""
    fresh: set[str] = set()
    for event in events:
        node = event.data.get("node")
        if event.type is not EventType.NODE_STARTED or not isinstance(node, str):
            continue
        if _index(event) is None:
            fresh.add(node)
        elif node not in fresh:
            return True
    return False


def live_update(events: Sequence[Event], earlier: Iterable[Event] = ()) -> Markup:
    """The streamed-text fragments (out of band) for one batch of a run's events, in order
    without gaps. A node that (re)started in the batch gets its block re-rendered whole, with a
    box per item (from ``earlier``, the run's events before the batch, when
    ``live_history_needed``); every other node's new text is appended to its box."""
    if not events:
        return Markup("")
    restarted = list(
        dict.fromkeys(
            node
            for e in events
            if e.type is EventType.NODE_STARTED and isinstance(node := e.data.get("node"), str)
        )
    )
    parts: list[str] = []
    if restarted:
        first = events[0].seq
        text = live_text([*(e for e in earlier if e.seq < first), *events])
        for node in restarted:
            parts.append(render("_live_node.html", node=node, boxes=text.get(node, []), oob=True))
    appended: dict[str, str] = {}
    for event in events:
        node = event.data.get("node")
        if event.type is EventType.NODE_DELTA and isinstance(node, str) and node not in restarted:
            key = box_id(node, _index(event))
            appended[key] = appended.get(key, "") + str(event.data.get("delta", ""))
    for key, chunk in appended.items():
        parts.append(str(Markup('<pre id="{}" hx-swap-oob="beforeend">{}</pre>').format(key, chunk)))
    return Markup("".join(parts))


ATTEMPT_EVENTS = (EventType.NODE_COMPLETED, EventType.NODE_FAILED, EventType.NODE_RETRYING)
"""The events that carry an attempt's ``details`` (what its agent noted with ``ctx.note``)."""


@dataclass(slots=True)
class NodeInputs:
    """What a node's latest attempt was given and sent: the run input, its map item (for a map
    node), and the ``details`` its agent noted (the rendered prompt and system message, the model,
    the request...), taken from the run's events."""

    input: Any = None
    index: int | None = None
    item: Any = None
    has_item: bool = False
    details: dict[str, Any] = field(default_factory=dict[str, Any])

    @property
    def prompt(self) -> Any:
        return self.details.get("prompt")

    @property
    def system(self) -> Any:
        return self.details.get("system")

    @property
    def other(self) -> dict[str, Any]:
        """The details other than the prompt and the system message (model, url...)."""
        return {k: v for k, v in self.details.items() if k not in ("prompt", "system") and v is not None}


def node_inputs(
    run: RunRecord, graph: Graph | None, nodes: dict[str, NodeSummary], node: str, events: Iterable[Event]
) -> NodeInputs:
    """The inputs of ``node``'s latest attempt that noted details (since the node's latest start:
    a retry, a loop's next pass or a map's start shows only what came after it). A map item's
    item is the node's ``map`` expression evaluated again with the nodes' latest outputs, as the
    store has no copy of it; left out if that fails."""
    inputs = NodeInputs(input=run.input)
    latest: Event | None = None
    for event in events:
        if event.data.get("node") != node:
            continue
        if event.type is EventType.NODE_STARTED and _index(event) is None:
            latest = None
        elif event.type in ATTEMPT_EVENTS and isinstance(event.data.get("details"), dict):
            latest = event
    if latest is None:
        return inputs
    inputs.details = dict(latest.data["details"])
    inputs.index = _index(latest)
    spec = graph.nodes.get(node) if graph is not None else None
    if inputs.index is not None and spec is not None and spec.map is not None:
        iteration = latest.data.get("iteration")
        outputs = {
            n: s.output for n, s in nodes.items() if s.status is NodeStatus.SUCCEEDED or s.output is not None
        }
        variables = {
            "input": run.input,
            "outputs": outputs,
            "run": {"id": run.id, "graph": run.graph, "version": run.version},
            "iteration": iteration if isinstance(iteration, int) else 0,
            "env": {},
        }
        try:
            items = spec.map.evaluate(variables)
        except ExpressionError:
            return inputs
        if isinstance(items, list | tuple) and inputs.index < len(items):
            seq: list[Any] | tuple[Any, ...] = items
            inputs.item, inputs.has_item = seq[inputs.index], True
    return inputs


def input_skeleton(schema: dict[str, Any] | None) -> str:
    """A starting JSON input for the start form, from the graph's input schema."""
    if not schema or schema.get("type") != "object":
        return "{}"
    blank: dict[str, Any] = {}
    properties: dict[str, Any] = schema.get("properties") or {}
    for name in schema.get("required") or list(properties):
        prop: Any = properties.get(name, {})
        kind = prop.get("type") if isinstance(prop, dict) else None
        if isinstance(prop, dict) and "default" in prop:
            blank[name] = prop["default"]
        else:
            blanks: dict[str, Any] = {"string": "", "integer": 0, "number": 0, "boolean": False, "array": []}
            blank[name] = blanks.get(str(kind))
    return json.dumps(blank, indent=2)


# --- formatting ---------------------------------------------------------------------------------


def duration(ms: int | float | None) -> str:
    if ms is None:
        return "—"
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} m {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} m"


def tokens(usage: Usage | None) -> str:
    if not usage:
        return "—"
    total = usage.get("total_tokens") or sum(v for k, v in usage.items() if k != "total_tokens")
    return f"{total:,}" if total else "—"


def when(value: datetime | None) -> Markup:
    if value is None:
        return Markup("—")
    return Markup('<time datetime="{0}" title="{0}">{1}</time>').format(
        value.isoformat(), value.strftime("%Y-%m-%d %H:%M:%S")
    )


def pretty(value: Any) -> str:
    """JSON for a ``<pre>``: strings as they are, everything else indented."""
    if isinstance(value, str):
        return value
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def compact(value: Any, limit: int = 400) -> str:
    """JSON on one line, cut at ``limit`` characters: a value shown in passing."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_elapsed(run: RunRecord) -> int | None:
    if run.duration_ms is not None:
        return run.duration_ms
    if run.started_at is not None and not run.status.ended:
        return round((utcnow() - run.started_at).total_seconds() * 1000)
    return None


@functools.cache
def environment(directory: Path = TEMPLATES) -> Environment:
    """The dashboard's Jinja2 environment (built once per template folder)."""
    env = Environment(
        loader=FileSystemLoader(directory),
        autoescape=select_autoescape(["html", "svg"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(duration=duration, tokens=tokens, when=when, pretty=pretty, compact=compact)
    extra: dict[str, Any] = {
        "RunStatus": RunStatus,
        "NodeStatus": NodeStatus,
        "EVENT_NAMES": ",".join(EventType),
        "LIFECYCLE_NAMES": ",".join(t for t in EventType if t is not EventType.NODE_DELTA),
        "run_elapsed": run_elapsed,
    }
    env.globals.update(extra)
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)
