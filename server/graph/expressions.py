"""Sandboxed Jinja2 templates and expressions.

Every template and expression of a graph is compiled when the graph is validated, in an
immutable sandbox with ``StrictUndefined``, no globals, an allow-list of filters, ``**`` and
sequence ``*`` intercepted (they could build huge values), and a cap on source length. The
context passed in is plain data only (dicts, lists, scalars).
"""

from __future__ import annotations

import functools
import operator as op
from collections.abc import Callable, Mapping
from types import CodeType
from typing import Any, cast

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.errors import ExpressionError

MAX_SOURCE = 10_000
"""Longest template or expression source, in characters."""

MAX_REPEAT = 100_000
"""Largest result of sequence ``*`` (items or characters)."""

MAX_POWER_EXPONENT = 64

ALLOWED_FILTERS = frozenset(
    {
        "abs", "attr", "batch", "capitalize", "center", "default", "d", "dictsort", "escape", "e",
        "first", "float", "format", "groupby", "indent", "int", "items", "join", "last", "length",
        "count", "list", "lower", "map", "max", "min", "reject", "rejectattr", "replace", "reverse",
        "round", "safe", "select", "selectattr", "slice", "sort", "string", "striptags", "sum",
        "title", "tojson", "trim", "truncate", "unique", "upper", "wordcount", "wordwrap",
    }
)  # fmt: skip


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"**", "*"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(right, int | float) and abs(right) > MAX_POWER_EXPONENT:
                raise ExpressionError(f"exponent {right} is too large (at most {MAX_POWER_EXPONENT})")
            return op.pow(left, right)
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > MAX_REPEAT:
                    raise ExpressionError(f"repetition too large (over {MAX_REPEAT} items)")
            return op.mul(left, right)
        return super().call_binop(context, operator, left, right)


class _Undefined(jinja2.StrictUndefined):
    """StrictUndefined whose message names what is there instead of Python's class names
    (``'server.engine.engine._CopyOnRead object' has no attribute 'x'``)."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        owner: Any = self._undefined_obj
        if self._undefined_hint is None and isinstance(owner, Mapping):
            keys: list[str] = [str(key) for key in cast(Mapping[Any, Any], owner)]
            shown = ", ".join(keys[:20]) + (", ..." if len(keys) > 20 else "")
            return f"no key {self._undefined_name!r} (" + (f"keys: {shown})" if shown else "it is empty)")
        return super()._undefined_message


def _environment() -> _Sandbox:
    env = _Sandbox(undefined=_Undefined, autoescape=False, keep_trailing_newline=True)
    env.globals.clear()
    env.filters = {k: v for k, v in env.filters.items() if k in ALLOWED_FILTERS}
    env.tests = dict(env.tests)
    env.policies["json.dumps_kwargs"] = {"sort_keys": False, "ensure_ascii": False}
    return env


ENV = _environment()


def _describe(exc: Exception) -> str:
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return f"{exc.message} (line {exc.lineno})"
    if isinstance(exc, jinja2.UndefinedError):
        return exc.message or "undefined value"
    return str(exc) or type(exc).__name__


def _check_length(source: str) -> None:
    if len(source) > MAX_SOURCE:
        raise ExpressionError(f"too long: {len(source)} characters (at most {MAX_SOURCE})")


@functools.lru_cache(maxsize=4096)
def _compile_expression(source: str) -> Callable[..., Any]:
    """Compiled once per source text: a large graph repeats its expressions."""
    return ENV.compile_expression(source, undefined_to_none=False)


@functools.lru_cache(maxsize=4096)
def _compile_template(source: str) -> CodeType:
    """Compiled once per source text (the code; each ``Template`` gets a template object of its
    own, since a prompt file's sets its name)."""
    return ENV.compile(source)


class Expression:
    """A compiled Jinja2 expression, such as ``not outputs.critic.approved``."""

    __slots__ = ("_fn", "source")

    def __init__(self, source: str) -> None:
        if not isinstance(source, str):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ExpressionError(f"an expression must be a string, not {type(source).__name__}")
        _check_length(source)
        try:
            self._fn: Callable[..., Any] = _compile_expression(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ExpressionError(f"invalid expression {source!r}: {_describe(exc)}") from None
        except RecursionError:
            raise ExpressionError(f"invalid expression {source[:60]!r}...: nested too deeply") from None
        self.source = source

    def evaluate(self, variables: Mapping[str, Any]) -> Any:
        """Evaluate against ``variables``; any failure is an ``ExpressionError``."""
        try:
            value = self._fn(**variables)
        except ExpressionError:
            raise
        except Exception as exc:
            raise ExpressionError(f"expression {self.source!r} failed: {_describe(exc)}") from None
        if isinstance(value, jinja2.Undefined):
            try:
                value._fail_with_undefined_error()
            except Exception as exc:
                raise ExpressionError(f"expression {self.source!r} failed: {_describe(exc)}") from None
        return value

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


class Template:
    """A compiled Jinja2 template, such as ``Summarize {{ input.topic }}``."""

    __slots__ = ("_template", "source")

    def __init__(self, source: str, name: str | None = None) -> None:
        if not isinstance(source, str):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ExpressionError(f"a template must be a string, not {type(source).__name__}")
        if name is None:  # prompt files may be longer than inline templates
            _check_length(source)
        where = f" in {name}" if name else ""
        try:
            code = _compile_template(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ExpressionError(f"invalid template{where}: {_describe(exc)}") from None
        except RecursionError:
            raise ExpressionError(f"invalid template{where}: nested too deeply") from None
        self._template = ENV.template_class.from_code(ENV, code, ENV.make_globals(None))
        if name:
            self._template.name = name
        self.source = source

    def render(self, variables: Mapping[str, Any]) -> str:
        """Render with ``variables``; any failure is an ``ExpressionError``."""
        try:
            return self._template.render(**variables)
        except ExpressionError:
            raise
        except Exception as exc:
            where = f" {self._template.name}" if self._template.name else ""
            raise ExpressionError(f"template{where} failed: {_describe(exc)}") from None

    def __repr__(self) -> str:
        return f"Template({self.source[:40]!r})"


TemplateTree = Any
"""A JSON value whose strings are compiled ``Template``s (the ``json`` and ``headers`` fields)."""


def compile_tree(value: Any) -> TemplateTree:
    """Compile every string inside a JSON value into a ``Template``."""
    if isinstance(value, str):
        return Template(value)
    if isinstance(value, list):
        return [compile_tree(v) for v in value]
    if isinstance(value, dict):
        return {str(k): compile_tree(v) for k, v in value.items()}
    return value


def render_tree(tree: TemplateTree, variables: Mapping[str, Any]) -> Any:
    """Render every ``Template`` inside a compiled tree, keeping the rest as it is."""
    if isinstance(tree, Template):
        return tree.render(variables)
    if isinstance(tree, list):
        return [render_tree(v, variables) for v in tree]
    if isinstance(tree, dict):
        return {k: render_tree(v, variables) for k, v in tree.items()}
    return tree
