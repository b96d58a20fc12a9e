"""The ``template`` kind: render a Jinja2 template or evaluate an expression. No I/O."""

from __future__ import annotations

from typing import Any

from pydantic import model_validator

from agents.registry import AgentConfig, agent
from server.engine.context import NodeContext
from server.graph.fields import ExpressionField, TemplateField


class TemplateConfig(AgentConfig):
    template: TemplateField | None = None
    """A Jinja2 template; the output is the rendered string."""
    value: ExpressionField | None = None
    """An expression; the output is its value (any JSON value)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> TemplateConfig:
        if (self.template is None) == (self.value is None):
            raise ValueError(
                "set exactly one of `template` (a Jinja2 template, rendered to a string) "
                "or `value` (an expression, whose value is the output)"
            )
        return self


@agent("template", config=TemplateConfig)
async def template(config: TemplateConfig, ctx: NodeContext) -> Any:
    """Render ``template`` or evaluate ``value`` with the node's variables."""
    if config.template is not None:
        return ctx.render(config.template)
    assert config.value is not None  # the config's validator makes one of them set
    return ctx.evaluate(config.value)
