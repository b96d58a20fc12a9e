"""Pydantic field types that compile templates and expressions while a graph is validated, so a
bad one is reported with its path (``nodes.critic.prompt``) before anything runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import PlainSerializer, PlainValidator, ValidationInfo, WithJsonSchema

from server.errors import ExpressionError
from server.graph.expressions import Expression, Template, TemplateTree, compile_tree


@dataclass(frozen=True, slots=True)
class ValidationContext:
    """What validation may consult beyond the graph itself; passed as pydantic's ``context``."""

    prompts_dir: Path | None = None

    def load_prompt(self, name: str) -> Template:
        """Compile the prompt file ``name`` from the prompts folder (a ValueError says what is wrong)."""
        if self.prompts_dir is None:
            raise ValueError(f"prompt file {name!r} cannot be used: no prompts folder is configured")
        root = self.prompts_dir.resolve()
        path = (root / name).resolve()
        if root not in path.parents:
            raise ValueError(f"prompt file {name!r} must be inside the prompts folder")
        try:
            source = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"prompt file {name!r} not found in {self.prompts_dir}") from None
        except OSError as exc:
            raise ValueError(f"prompt file {name!r} cannot be read: {exc}") from None
        try:
            return Template(source, name=name)
        except ExpressionError as exc:
            raise ValueError(str(exc)) from None


def validation_context(info: ValidationInfo) -> ValidationContext:
    ctx = info.context
    if isinstance(ctx, ValidationContext):
        return ctx
    return ValidationContext()


def _expression(value: Any) -> Expression:
    if isinstance(value, Expression):
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be an expression string, not {type(value).__name__}")
    try:
        return Expression(value)
    except ExpressionError as exc:
        raise ValueError(str(exc)) from None


def _template(value: Any) -> Template:
    if isinstance(value, Template):
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be a template string, not {type(value).__name__}")
    try:
        return Template(value)
    except ExpressionError as exc:
        raise ValueError(str(exc)) from None


def _tree(value: Any) -> TemplateTree:
    try:
        return compile_tree(value)
    except ExpressionError as exc:
        raise ValueError(str(exc)) from None


def _source(value: Any) -> Any:
    if isinstance(value, Expression | Template):
        return value.source
    if isinstance(value, list):
        return [_source(v) for v in value]
    if isinstance(value, dict):
        return {k: _source(v) for k, v in value.items()}
    return value


ExpressionField = Annotated[
    Expression, PlainValidator(_expression), PlainSerializer(_source), WithJsonSchema({"type": "string"})
]
"""A Jinja2 expression (``when``, ``map``, ``output``, ``value``), compiled at validation."""

TemplateField = Annotated[
    Template, PlainValidator(_template), PlainSerializer(_source), WithJsonSchema({"type": "string"})
]
"""A Jinja2 template string (``prompt``, ``url``, ...), compiled at validation."""

TemplateTreeField = Annotated[Any, PlainValidator(_tree), PlainSerializer(_source), WithJsonSchema({})]
"""A JSON value whose strings are Jinja2 templates (``json``, ``headers``), compiled at validation."""
