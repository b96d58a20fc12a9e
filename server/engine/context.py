"""The context an agent gets for one attempt of one node: what it may read and the few things it
may do (render its templates, stream ``node.delta`` text, reach shared resources such as the HTTP
client or the LLM clients). This is the only part of the engine that ``agents/`` imports."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from server.graph.expressions import Expression, TemplateTree, render_tree

T = TypeVar("T")


class Resources:
    """Shared, long-lived objects the host process provides to agents, looked up by type.

    The engine imports no I/O library, so the HTTP client, the LLM clients, the prompt loader and
    so on are created by the process that runs the engine and handed over here.
    """

    def __init__(self, *objects: object) -> None:
        self._by_type: dict[type, object] = {}
        for obj in objects:
            self.add(obj)

    def add(self, obj: object, as_type: type | None = None) -> None:
        self._by_type[as_type or type(obj)] = obj

    def get(self, kind: type[T]) -> T:
        """The object registered for ``kind``; a clear error if the host did not provide one."""
        try:
            return cast(T, self._by_type[kind])
        except KeyError:
            raise LookupError(
                f"no {kind.__name__} was provided to the engine; did you forget to pass it in Resources?"
            ) from None

    def find(self, kind: type[T]) -> T | None:
        return cast("T | None", self._by_type.get(kind))


@dataclass(slots=True)
class NodeContext:
    """Everything one attempt of one node sees.

    ``variables`` is the template context DESIGN.md names: ``input``, ``outputs``, ``item`` and
    ``index`` (inside a map), ``run``, ``iteration``, ``env``.
    """

    run_id: str
    graph: str
    node: str
    attempt: int
    iteration: int
    variables: Mapping[str, Any]
    resources: Resources
    index: int | None = None
    _emit_delta: Callable[[str], Awaitable[None]] | None = None
    usage: dict[str, int] = field(default_factory=dict[str, int])
    details: dict[str, Any] = field(default_factory=dict[str, Any])
    """What ``note`` recorded: goes out as ``details`` in this attempt's node event."""

    def render(self, tree: TemplateTree) -> Any:
        """Render a compiled template (or a JSON value of templates) with this node's variables."""
        return render_tree(tree, self.variables)

    def evaluate(self, expression: Expression) -> Any:
        return expression.evaluate(self.variables)

    async def delta(self, text: str) -> None:
        """Stream a chunk of text (an LLM token chunk) as a ``node.delta`` event."""
        if self._emit_delta is not None and text:
            await self._emit_delta(text)

    def add_usage(self, usage: Mapping[str, int]) -> None:
        """Add token usage for this attempt (summed into the node's and the run's usage)."""
        for key, value in usage.items():
            self.usage[key] = self.usage.get(key, 0) + int(value)

    def note(self, **values: Any) -> None:
        """Record details of this attempt shown to users (e.g. the rendered prompt); plain JSON
        data. They go out as ``details`` in the node's ``node.completed``, ``node.failed`` or
        ``node.retrying`` event; a later note of the same name replaces the earlier one."""
        self.details.update(values)
