"""The registry of agent kinds.

A kind is an async callable ``(config, ctx) -> output`` plus a pydantic model of the node fields
it accepts (beyond the engine's own: ``agent``, ``map``, ``timeout``, ``retry``, ``on_error``).
The ``@agent`` decorator only marks a function; a ``Registry`` collects the marked functions of
the modules it loads, so there is no global mutable state::

    # my_agents.py, loaded with BRAID_AGENT_MODULES=my_agents
    from agents import AgentConfig, NodeContext, agent

    class ShoutConfig(AgentConfig):
        text: TemplateField

    @agent("shout", config=ShoutConfig)
    async def shout(config: ShoutConfig, ctx: NodeContext) -> str:
        return ctx.render(config.text).upper()
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from server.engine.context import NodeContext
from server.errors import SettingsError

BUILTIN_MODULES = ("agents.template", "agents.wait", "agents.http", "agents.llm")


class AgentConfig(BaseModel):
    """Base of every kind's config model: unknown fields are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


AgentFn = Callable[[Any, NodeContext], Awaitable[Any]]
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


@dataclass(frozen=True, slots=True)
class AgentKind:
    name: str
    config: type[AgentConfig]
    run: AgentFn


def agent(name: str, *, config: type[AgentConfig] = AgentConfig) -> Callable[[F], F]:
    """Mark an async function as the agent kind ``name`` whose node fields ``config`` validates."""

    def mark(fn: F) -> F:
        fn.__braid_agent__ = AgentKind(name, config, fn)  # type: ignore[attr-defined]
        return fn

    return mark


class Registry:
    """Agent kinds by name."""

    def __init__(self, kinds: Iterable[AgentKind] = ()) -> None:
        self._kinds: dict[str, AgentKind] = {}
        for kind in kinds:
            self.add(kind)

    def add(self, kind: AgentKind) -> None:
        if kind.name in self._kinds and self._kinds[kind.name].run is not kind.run:
            raise SettingsError(f"agent kind {kind.name!r} is registered twice")
        self._kinds[kind.name] = kind

    def load(self, module: ModuleType | str) -> None:
        """Register every ``@agent`` function of ``module`` (a module or its dotted name)."""
        if isinstance(module, str):
            try:
                module = importlib.import_module(module)
            except ImportError as exc:
                raise SettingsError(
                    f"BRAID_AGENT_MODULES: cannot import {module!r} ({exc}); is it on PYTHONPATH?"
                ) from exc
        for value in vars(module).values():
            kind = getattr(value, "__braid_agent__", None)
            if isinstance(kind, AgentKind):
                self.add(kind)

    def get(self, name: str) -> AgentKind | None:
        return self._kinds.get(name)

    def names(self) -> list[str]:
        return sorted(self._kinds)


def default_registry(extra_modules: Iterable[str] = ()) -> Registry:
    """The built-in kinds plus the kinds of the user's modules (BRAID_AGENT_MODULES)."""
    registry = Registry()
    for name in (*BUILTIN_MODULES, *extra_modules):
        registry.load(name)
    return registry
