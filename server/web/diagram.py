"""A graph drawn as server-rendered SVG.

Nodes go left to right by dependency level (the longest path to them over forward edges), one
column per level; back edges (loops) are drawn as curves under the nodes. Each node is a
``<g id="node-<id>" class="node status-<status>">`` so the dashboard can swap one node's
fragment (``node_svg``) over SSE and CSS colours it by its ``NodeStatus``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from markupsafe import Markup, escape

from server.graph.model import Edge, Graph
from server.status import NodeStatus

NODE_WIDTH = 150
NODE_HEIGHT = 54
COLUMN_GAP = 52
ROW_GAP = 24
PAD = 16
LOOP_DEPTH = 26  # how far below the lowest node a loop's curve passes (then 10 more per loop)
MIN_SCALE = 0.7


@dataclass(frozen=True, slots=True)
class Box:
    id: str
    kind: str
    level: int
    x: float
    y: float
    mapped: bool = False

    @property
    def cx(self) -> float:
        return self.x + NODE_WIDTH / 2


@dataclass(frozen=True, slots=True)
class Path:
    source: str
    target: str
    d: str
    back: bool
    when: str | None


@dataclass(slots=True)
class Layout:
    boxes: dict[str, Box]
    paths: list[Path]
    width: float
    height: float
    levels: list[list[str]] = field(default_factory=list[list[str]])


@dataclass(frozen=True, slots=True)
class NodeView:
    """How one node looks right now: its status and a short note (attempts, iterations)."""

    status: NodeStatus = NodeStatus.PENDING
    note: str = ""


def levels(graph: Graph) -> dict[str, int]:
    """Each node's column: 0 for entry nodes, else one more than its deepest forward predecessor."""
    forward = [e for e in graph.edges if not e.back]
    indegree = dict.fromkeys(graph.nodes, 0)
    for edge in forward:
        indegree[edge.target] += 1
    level = dict.fromkeys(graph.nodes, 0)
    ready = [n for n in graph.nodes if indegree[n] == 0]
    while ready:
        node = ready.pop(0)
        for edge in forward:
            if edge.source != node:
                continue
            level[edge.target] = max(level[edge.target], level[node] + 1)
            indegree[edge.target] -= 1
            if indegree[edge.target] == 0:
                ready.append(edge.target)
    return level


def layout(graph: Graph) -> Layout:
    """Place every node and route every edge."""
    level = levels(graph)
    columns: list[list[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for node in graph.nodes:  # declaration order within a column...
        columns[level[node]].append(node)
    # ...then by the mean row of the predecessors, to keep edges short and uncrossed.
    row: dict[str, float] = {n: float(i) for i, n in enumerate(columns[0])} if columns else {}
    for column in columns[1:]:

        def mean_row(node: str) -> float:
            rows = [row[e.source] for e in graph.edges if e.target == node and not e.back and e.source in row]
            return sum(rows) / len(rows) if rows else 0.0

        column.sort(key=mean_row)
        row.update({n: float(i) for i, n in enumerate(column)})

    tallest = max((len(c) for c in columns), default=0)
    inner_height = tallest * NODE_HEIGHT + max(tallest - 1, 0) * ROW_GAP
    boxes: dict[str, Box] = {}
    for index, column in enumerate(columns):
        height = len(column) * NODE_HEIGHT + (len(column) - 1) * ROW_GAP
        top = PAD + (inner_height - height) / 2
        for i, node in enumerate(column):
            boxes[node] = Box(
                id=node,
                kind=graph.nodes[node].agent.name,
                level=index,
                x=PAD + index * (NODE_WIDTH + COLUMN_GAP),
                y=top + i * (NODE_HEIGHT + ROW_GAP),
                mapped=graph.nodes[node].map is not None,
            )
    bottom = PAD + inner_height
    loops = [e for e in graph.edges if e.back]
    paths = [_route(e, boxes, bottom, loops.index(e) if e.back else 0) for e in graph.edges]
    width = 2 * PAD + len(columns) * NODE_WIDTH + max(len(columns) - 1, 0) * COLUMN_GAP
    height = bottom + PAD + (LOOP_DEPTH + 10 * (len(loops) - 1) if loops else 0)
    return Layout(boxes=boxes, paths=paths, width=width, height=height, levels=columns)


def _route(edge: Edge, boxes: Mapping[str, Box], bottom: float, loop_index: int) -> Path:
    s, t = boxes[edge.source], boxes[edge.target]
    when = edge.when.source if edge.when is not None else None
    if not edge.back:
        x1, y1 = s.x + NODE_WIDTH, s.y + NODE_HEIGHT / 2
        x2, y2 = t.x, t.y + NODE_HEIGHT / 2
        bend = max((x2 - x1) / 2, 20)
        d = f"M{x1:g},{y1:g} C{x1 + bend:g},{y1:g} {x2 - bend:g},{y2:g} {x2:g},{y2:g}"
        return Path(edge.source, edge.target, d, False, when)
    # A loop leaves the bottom of its source and comes back to the bottom of its target, curving
    # under every node so it never hides one.
    y1, y2 = s.y + NODE_HEIGHT, t.y + NODE_HEIGHT
    # Its lowest point (at t = 1/2 of the cubic: 1/8 of each end, 3/4 of the control points' depth)
    # lies LOOP_DEPTH under the lowest node, however high its own nodes are.
    lowest = bottom + LOOP_DEPTH + 10 * loop_index
    depth = round((lowest - (y1 + y2) / 8) / 0.75, 1)
    if edge.source == edge.target:
        x1, x2 = s.cx + 20, s.cx - 20
    else:
        x1, x2 = s.cx - 10, t.cx + 10
    d = f"M{x1:g},{y1:g} C{x1:g},{depth:g} {x2:g},{depth:g} {x2:g},{y2 + 2:g}"
    return Path(edge.source, edge.target, d, True, when)


def node_svg(box: Box, view: NodeView | None, attrs: Mapping[str, str] | None = None) -> Markup:
    """One node's ``<g>``: the fragment swapped live (inside an ``<svg>`` wrapper) by its id.
    Without a ``view`` (a graph, not a run) it shows the node's kind, and whether it maps."""
    second = f"{box.kind} · map" if box.mapped else box.kind
    if view is None:
        view = NodeView()
    else:
        second = f"{box.kind} · {view.status}"
    extra = "".join(f' {escape(k)}="{escape(v)}"' for k, v in (attrs or {}).items())
    note = f" · {view.note}" if view.note else ""
    # Two lines (the id, then its kind and status) or, with a note (iterations, tries, items),
    # three: the note on its own line, so that no line runs out of the box.
    lines = [(box.id, "label", 18), (second, "kind", 26)]
    if view.note:
        lines.append((view.note, "kind note", 26))
    baselines = (23, 39) if len(lines) == 2 else (17, 32, 46)
    texts = "".join(
        f'<text class="{cls}" x="{box.cx:g}" y="{box.y + baseline:g}">{escape(_clip(text, size))}</text>'
        for (text, cls, size), baseline in zip(lines, baselines, strict=True)
    )
    return Markup(
        f'<g id="node-{escape(box.id)}" class="node status-{escape(view.status)}" '
        f'data-node="{escape(box.id)}" data-status="{escape(view.status)}"{extra}>'
        f"<title>{escape(box.id)} ({escape(box.kind)}): {escape(view.status)}{escape(note)}</title>"
        f'<rect x="{box.x:g}" y="{box.y:g}" width="{NODE_WIDTH}" height="{NODE_HEIGHT}" rx="8"></rect>'
        f"{texts}</g>"
    )


def render(
    graph: Graph,
    views: Mapping[str, NodeView] | None = None,
    node_attrs: Mapping[str, Mapping[str, str]] | None = None,
    the_layout: Layout | None = None,
) -> Markup:
    """The whole diagram as an ``<svg>`` element, nodes coloured by ``views`` (a run's: a node
    missing from them is pending), or plain without (a graph's)."""
    plan = the_layout or layout(graph)
    # The viewBox holds the whole drawing, so CSS may scale it to its card: down to MIN_SCALE of
    # its size (never up), below which the card scrolls sideways rather than shrink the text.
    parts = [
        '<svg class="diagram" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {plan.width:g} {plan.height:g}" width="{plan.width:g}" height="{plan.height:g}" '
        f'style="max-width: {plan.width:g}px; min-width: {plan.width * MIN_SCALE:.0f}px" '
        'role="img" '
        f'aria-label="graph {escape(graph.name)}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z"></path></marker></defs>',
    ]
    for path in plan.paths:
        cls = "edge back" if path.back else "edge"
        label = f"{path.source} → {path.target}" + (f" when {path.when}" if path.when else "")
        parts.append(
            f'<path class="{cls}{" conditional" if path.when else ""}" d="{path.d}" marker-end="url(#arrow)" '
            f'data-source="{escape(path.source)}" data-target="{escape(path.target)}">'
            f"<title>{escape(label)}</title></path>"
        )
    for node_id, box in plan.boxes.items():
        view = None if views is None else views.get(node_id, NodeView())
        parts.append(node_svg(box, view, (node_attrs or {}).get(node_id)))
    parts.append("</svg>")
    return Markup("".join(parts))


def _clip(text: str, size: int) -> str:
    return text if len(text) <= size else text[: size - 1] + "…"
