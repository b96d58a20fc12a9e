"""A validated graph: nodes, edges and the topology the engine needs, all computed once when
the graph is built (``server.graph.parse.build_graph``). Immutable after that."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from server.graph.expressions import Expression


def is_unicode(text: str) -> bool:
    """Whether ``text`` is valid Unicode (no lone surrogate such as ``"\\ud800"``), as JSON text
    that every client, store and database can take must be."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


if TYPE_CHECKING:  # agents.registry imports the engine, which imports this module
    from agents.registry import AgentConfig, AgentKind

OnError = Literal["fail", "continue"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 3
    initial_delay: float = 0.5
    multiplier: float = 2.0
    max_delay: float = 20.0
    jitter: bool = True


@dataclass(frozen=True, slots=True)
class Node:
    id: str
    agent: AgentKind
    config: AgentConfig
    map: Expression | None = None
    timeout: float = 120.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    on_error: OnError = "fail"
    description: str | None = None


@dataclass(frozen=True, slots=True)
class Edge:
    """One edge (list sugar already expanded). ``index`` is its position in the expanded list;
    ``back`` is True for a back edge (it points to an ancestor: a loop)."""

    source: str
    target: str
    when: Expression | None = None
    back: bool = False
    index: int = 0


@dataclass(frozen=True, slots=True)
class Graph:
    """A validated graph.

    Topology (all forward edges unless said otherwise):
        entry: nodes with no incoming forward edge, in declaration order.
        incoming[n]: forward edges into n.   outgoing[n]: every edge out of n, back edges included.
        loop_body[i]: for the back edge with index i, the nodes on paths from its target to its
            source (both included) — what is reset when that back edge is taken.
        order: the nodes in a topological order of the forward edges.
    """

    name: str
    nodes: dict[str, Node]
    edges: list[Edge]
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    max_steps: int = 200
    concurrency: int = 16
    output: Expression | None = None
    spec: dict[str, Any] = field(default_factory=dict[str, Any])
    entry: list[str] = field(default_factory=list[str])
    incoming: dict[str, list[Edge]] = field(default_factory=dict[str, list[Edge]])
    outgoing: dict[str, list[Edge]] = field(default_factory=dict[str, list[Edge]])
    loop_body: dict[int, frozenset[str]] = field(default_factory=dict[int, frozenset[str]])
    order: list[str] = field(default_factory=list[str])

    @property
    def back_edges(self) -> list[Edge]:
        return [e for e in self.edges if e.back]
