"""The shape of a graph: which edges loop back, where runs start, what a loop resets, and which
cycles could never end. Pure functions over node ids and edges; ``parse`` turns the findings into
problems and the ``Graph``'s topology fields."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Link:
    """An edge before it is classified. ``position`` is its index in the document's edge list."""

    source: str
    target: str
    conditional: bool
    position: int


@dataclass(slots=True)
class Topology:
    """What ``analyse`` finds; edges are referred to by their index in the list of links."""

    back: set[int] = field(default_factory=set[int])
    entry: list[str] = field(default_factory=list[str])
    order: list[str] = field(default_factory=list[str])
    loop_body: dict[int, frozenset[str]] = field(default_factory=dict[int, frozenset[str]])
    unreachable: list[str] = field(default_factory=list[str])
    endless: list[tuple[int, list[str]]] = field(default_factory=list[tuple[int, list[str]]])
    """Loops with no ``when`` on any edge: (the link that closes it, the node ids around it)."""


def analyse(nodes: Sequence[str], links: Sequence[Link]) -> Topology:
    """Classify ``links`` over ``nodes`` (both in declaration order)."""
    top = Topology()
    outgoing: dict[str, list[int]] = {n: [] for n in nodes}
    in_degree = dict.fromkeys(nodes, 0)
    for k, link in enumerate(links):
        outgoing[link.source].append(k)
        in_degree[link.target] += 1

    # DESIGN.md: a depth-first walk from the entry nodes in declaration order; an edge to a node
    # still on the walk's stack points back to an ancestor. A graph made only of cycles has no
    # node without incoming edges, so its walk starts at the first declared node.
    roots = [n for n in nodes if in_degree[n] == 0] or list(nodes[:1])
    visited = _depth_first(roots, links, outgoing, top.back)
    top.unreachable = [n for n in nodes if n not in visited]

    forward = [k for k in range(len(links)) if k not in top.back]
    preds: dict[str, list[str]] = {n: [] for n in nodes}
    succs: dict[str, list[str]] = {n: [] for n in nodes}
    for k in forward:
        succs[links[k].source].append(links[k].target)
        preds[links[k].target].append(links[k].source)
    top.entry = [n for n in nodes if not preds[n]]
    top.order = _topological(nodes, succs, preds)
    for k in sorted(top.back):
        link = links[k]
        top.loop_body[k] = frozenset(_reach(link.target, succs) & _reach(link.source, preds))
    top.endless = _endless_loops(nodes, links, top.back)
    return top


def _depth_first(
    roots: Iterable[str], links: Sequence[Link], outgoing: dict[str, list[int]], back: set[int]
) -> set[str]:
    on_stack: set[str] = set()
    visited: set[str] = set()
    for root in roots:
        if root in visited:
            continue
        visited.add(root)
        on_stack.add(root)
        stack = [(root, iter(outgoing[root]))]
        while stack:
            node, pending = stack[-1]
            for k in pending:
                target = links[k].target
                if target in on_stack:
                    back.add(k)
                elif target not in visited:
                    visited.add(target)
                    on_stack.add(target)
                    stack.append((target, iter(outgoing[target])))
                    break
            else:
                on_stack.discard(node)
                stack.pop()
    return visited


def _topological(nodes: Sequence[str], succs: dict[str, list[str]], preds: dict[str, list[str]]) -> list[str]:
    """Kahn's algorithm, ties broken by declaration order so the order is stable."""
    rank = {n: i for i, n in enumerate(nodes)}
    waiting = {n: len(preds[n]) for n in nodes}
    ready = [rank[n] for n in nodes if waiting[n] == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        node = nodes[heapq.heappop(ready)]
        order.append(node)
        for succ in succs[node]:
            waiting[succ] -= 1
            if waiting[succ] == 0:
                heapq.heappush(ready, rank[succ])
    return order


def _reach(start: str, step: dict[str, list[str]]) -> set[str]:
    seen = {start}
    todo = [start]
    while todo:
        for nxt in step[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _endless_loops(
    nodes: Sequence[str], links: Sequence[Link], back: set[int]
) -> list[tuple[int, list[str]]]:
    """Cycles whose edges all lack ``when``: nothing could ever stop them (only ``max_steps``)."""
    plain: dict[str, list[int]] = {n: [] for n in nodes}
    for k, link in enumerate(links):
        if not link.conditional:
            plain[link.source].append(k)
    step = {n: [links[k].target for k in plain[n]] for n in nodes}
    rstep: dict[str, list[str]] = {n: [] for n in nodes}
    for n in nodes:
        for t in step[n]:
            rstep[t].append(n)

    found: list[tuple[int, list[str]]] = []
    closed: set[frozenset[str]] = set()
    components = _components(nodes, step, rstep)
    # A plain cycle among reachable nodes holds at least one back edge (forward edges are acyclic):
    # report each plain back edge that closes one. Cycles among unreachable nodes have no back
    # edge; report one per strongly connected component there.
    candidates = [k for k in sorted(back) if not links[k].conditional]
    candidates += [k for k in range(len(links)) if k not in back and not links[k].conditional]
    for k in candidates:
        link = links[k]
        component = components[link.target]
        if link.source not in component:
            continue
        if k not in back and component in closed:
            continue
        closed.add(component)
        found.append((k, [*_path(link.target, link.source, step, component), link.target]))
    return found


def _components(
    nodes: Sequence[str], step: dict[str, list[str]], rstep: dict[str, list[str]]
) -> dict[str, frozenset[str]]:
    """Each node's strongly connected component (Kosaraju's two walks, without recursion): linear
    in nodes and edges, so a large graph validates in time proportional to its size."""
    finished: list[str] = []
    seen: set[str] = set()
    for root in nodes:
        if root in seen:
            continue
        seen.add(root)
        stack = [(root, iter(step[root]))]
        while stack:
            node, pending = stack[-1]
            for nxt in pending:
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, iter(step[nxt])))
                    break
            else:
                finished.append(node)
                stack.pop()
    components: dict[str, frozenset[str]] = {}
    for root in reversed(finished):
        if root in components:
            continue
        members = {root}
        todo = [root]
        while todo:
            for prev in rstep[todo.pop()]:
                if prev not in members and prev not in components:
                    members.add(prev)
                    todo.append(prev)
        component = frozenset(members)
        for member in component:
            components[member] = component
    return components


def _path(start: str, goal: str, step: dict[str, list[str]], within: frozenset[str]) -> list[str]:
    """A shortest path from ``start`` to ``goal`` inside ``within`` (it exists)."""
    parent: dict[str, str | None] = {start: None}
    queue = [start]
    for node in queue:
        if node == goal:
            break
        for nxt in step[node]:
            if nxt in within and nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    path: list[str] = []
    at: str | None = goal
    while at is not None:
        path.append(at)
        at = parent[at]
    return path[::-1]
