"""Read a graph document (JSON or YAML) and validate it into a ``Graph``.

Validation never stops at the first mistake: every problem is collected with its dotted path
(``nodes.critic.output``, ``edges[3].to``) and raised together as one ``ValidationFailed``.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast, get_args

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from agents.registry import AgentKind, Registry
from server.errors import ExpressionError, Problem, ValidationFailed
from server.graph.expressions import Expression
from server.graph.fields import ExpressionField, ValidationContext
from server.graph.model import Edge, Graph, Node, RetryPolicy, is_unicode
from server.graph.topology import Link, analyse

SLUG = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
RESERVED_IDS = frozenset(name for name in dir(dict) if not name.startswith("_"))
"""Node ids that `outputs.<id>` could not reach in a template (Jinja2 finds the dict method first)."""
SLUG_RULE = "use 1-64 lowercase letters, digits, '-' or '_', starting with a letter or a digit"

ENGINE_KEYS = ("agent", "map", "timeout", "retry", "on_error", "description")
"""Node keys the engine reads itself; every other key goes to the agent kind's config."""

DEFAULTABLE = ("timeout", "retry", "on_error")
"""Engine keys that ``defaults`` applies to every node."""

MAX_VALUES = 100_000
"""Most values a document may hold once YAML aliases are expanded (stops alias bombs)."""

MAX_NODES = 2_000
MAX_EDGES = 20_000
"""Most nodes and edges (after the ``from``/``to`` list sugar) one graph may have: validating
the largest graph, every node with a template of its own, takes about a second."""

MAX_DEPTH = 100
"""Most levels of nesting a document or a run's input may have: data nested deeper than Python's
recursion limit allows could be stored but not read back, validated or rendered."""

NESTED_TOO_DEEPLY = f"the document is nested too deeply (over {MAX_DEPTH} levels)"

Loc = Sequence[str | int]


def dotted(loc: Iterable[str | int]) -> str:
    """``("edges", 3, "to")`` -> ``"edges[3].to"``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else part
    return out


# --- reading documents -------------------------------------------------------------------------


def load_document(body: str | bytes, content_type: str | None = None) -> dict[str, Any]:
    """Parse a graph document: YAML when ``content_type`` says so, JSON when it says so, else JSON
    with YAML as the fallback. Duplicate keys are problems (``nodes.<id>`` for a node declared
    twice); so are a syntax error (with its line) and a document that is not a mapping."""
    text = _decode(body)
    kind = (content_type or "").lower()
    if "yaml" in kind:
        data = _load_yaml(text)
    elif "json" in kind:
        try:
            data = _load_json(text)
        except _JSONSyntax as exc:
            raise exc.failure from None
    else:
        try:
            data = _load_json(text)
        except _JSONSyntax as json_error:
            try:
                data = _load_yaml(text)
            except ValidationFailed:
                if text.lstrip().startswith(("{", "[")):
                    raise json_error.failure from None
                raise
    if not isinstance(data, dict):
        raise ValidationFailed(
            [Problem("", f"a graph must be a mapping (name, nodes, edges, ...), not {_kind(data)}")]
        )
    return cast(dict[str, Any], data)


def _decode(body: str | bytes) -> str:
    if isinstance(body, str):
        return body
    try:
        return body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValidationFailed([Problem("", f"the document is not UTF-8 text: {exc}")]) from None


class _JSONSyntax(Exception):
    def __init__(self, failure: ValidationFailed) -> None:
        self.failure = failure


class _Object(dict[str, Any]):
    """A JSON object that remembers the keys it saw twice."""

    duplicates: list[str]


def _pairs(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def _load_json(text: str) -> Any:
    try:
        data = json.loads(text, object_pairs_hook=_pairs)
    except json.JSONDecodeError as exc:
        message = f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        raise _JSONSyntax(ValidationFailed([Problem("", message)])) from None
    except RecursionError:
        raise ValidationFailed([Problem("", NESTED_TOO_DEEPLY)]) from None
    if too_deep(data):
        raise ValidationFailed([Problem("", NESTED_TOO_DEEPLY)])
    problems: list[Problem] = []
    data = _plain_json(data, (), problems)
    problems += json_problems(data)
    if problems:
        raise ValidationFailed(problems)
    return data


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether lists and mappings in ``value`` nest more than ``limit`` levels (walked without recursion)."""
    todo: list[tuple[Any, int]] = [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict | list):
            if depth >= limit:
                return True
            children = (
                cast(dict[Any, Any], item).values() if isinstance(item, dict) else cast(list[Any], item)
            )
            todo.extend((child, depth + 1) for child in children)
    return False


def json_problems(value: Any, loc: tuple[str | int, ...] = ()) -> list[Problem]:
    """Where ``value`` is not plain JSON data that every store and client can take: a value of
    another type (YAML's ``!!binary`` or ``!!set``), a number that is not finite (``NaN``,
    ``Infinity``), a string that is not valid Unicode (a lone surrogate such as ``"\\ud800"``)."""
    problems: list[Problem] = []
    todo: list[tuple[Any, tuple[str | int, ...]]] = [(value, loc)]
    while todo and len(problems) < 100:
        item, at = todo.pop()
        if isinstance(item, str):
            if not item.isascii() and not is_unicode(item):
                problems.append(Problem(dotted(at), "a string that is not valid Unicode (a lone surrogate)"))
        elif isinstance(item, bool | int | None):
            pass
        elif isinstance(item, float):
            if not math.isfinite(item):
                problems.append(Problem(dotted(at), f"{item} is not a JSON number; use a finite number"))
        elif isinstance(item, dict):
            for key, v in cast(dict[Any, Any], item).items():
                if not isinstance(key, str):
                    problems.append(Problem(dotted(at), f"the key {key!r} is not a string"))
                    continue
                if not key.isascii() and not is_unicode(key):
                    problems.append(Problem(dotted(at), "a key that is not valid Unicode (a lone surrogate)"))
                todo.append((v, (*at, key)))
        elif isinstance(item, list):
            todo.extend((v, (*at, i)) for i, v in enumerate(cast(list[Any], item)))
        else:
            problems.append(Problem(dotted(at), f"a {type(item).__name__} value is not JSON data"))
    return sorted(problems, key=lambda p: p.path)


def _plain_json(value: Any, loc: tuple[str | int, ...], problems: list[Problem]) -> Any:
    if isinstance(value, _Object):
        for key in dict.fromkeys(value.duplicates):
            problems.append(Problem(dotted((*loc, key)), _duplicate_message(loc, key)))
        return {k: _plain_json(v, (*loc, k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_json(v, (*loc, i), problems) for i, v in enumerate(cast(list[Any], value))]
    return value


def _duplicate_message(loc: Loc, key: str, where: str = "") -> str:
    if tuple(loc) == ("nodes",):
        return f"{where}node {key!r} is declared twice; node ids must be unique"
    return f"{where}key {key!r} appears twice in the same mapping"


_STR = "tag:yaml.org,2002:str"
_MERGE = "tag:yaml.org,2002:merge"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"


class _Loader(yaml.SafeLoader):
    """``safe_load`` without timestamps, so a document stays plain JSON data."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _load_yaml(text: str) -> Any:
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        problems: list[Problem] = []
        _check_yaml(root, (), problems, [0])
        if problems:
            raise ValidationFailed(problems)
        data = loader.construct_document(root)
        if too_deep(data):
            raise ValidationFailed([Problem("", NESTED_TOO_DEEPLY)])
        problems = json_problems(data)
        if problems:
            raise ValidationFailed(problems)
        return data
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ValidationFailed([Problem("", f"invalid YAML{where}: {what}")]) from None
    except yaml.YAMLError as exc:
        raise ValidationFailed([Problem("", f"invalid YAML: {exc}")]) from None
    except RecursionError:
        raise ValidationFailed([Problem("", NESTED_TOO_DEEPLY)]) from None
    finally:
        loader.dispose()


def _check_yaml(
    node: yaml.Node, loc: tuple[str | int, ...], problems: list[Problem], count: list[int]
) -> None:
    """Find duplicate and non-string keys, which ``safe_load`` would silently accept."""
    count[0] += 1
    if count[0] > MAX_VALUES:
        raise ValidationFailed(
            [Problem("", f"the document holds over {MAX_VALUES} values (aliases included)")]
        )
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(cast(list[yaml.Node], node.value)):
            _check_yaml(item, (*loc, i), problems, count)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    lines: dict[str, int] = {}
    for key_node, value_node in cast(list[tuple[yaml.Node, yaml.Node]], node.value):
        line = key_node.start_mark.line + 1
        if key_node.tag == _MERGE:
            _check_yaml(value_node, loc, problems, count)
            continue
        if not isinstance(key_node, yaml.ScalarNode):
            problems.append(Problem(dotted(loc), f"line {line}: a key must be a plain string"))
            continue
        key = cast(str, key_node.value)
        path = dotted((*loc, key))
        if key_node.tag != _STR:
            read_as = key_node.tag.rsplit(":", 1)[-1]
            problems.append(
                Problem(path, f"line {line}: YAML reads the key {key!r} as a {read_as}; quote it: '{key}'")
            )
        if key in lines:
            problems.append(
                Problem(
                    path, _duplicate_message(loc, key, f"line {line}: ") + f" (first at line {lines[key]})"
                )
            )
        else:
            lines[key] = line
        _check_yaml(value_node, (*loc, key), problems, count)


# --- the raw document ----------------------------------------------------------------------


def _names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in cast(list[Any], value)):
        return cast(list[str], value)
    raise ValueError("must be a node id or a non-empty list of node ids")


class _Document(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str | None = None
    input: dict[str, Any] | None = None
    defaults: dict[str, Any] = Field(default_factory=dict[str, Any])
    max_steps: int = Field(default=200, ge=1)
    concurrency: int = Field(default=16, ge=1)
    nodes: dict[str, Any]
    edges: list[Any] = Field(default_factory=list[Any])
    output: ExpressionField | None = None


class _Retry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    attempts: int = Field(default=3, ge=1)
    initial_delay: float = Field(default=0.5, ge=0, allow_inf_nan=False)
    multiplier: float = Field(default=2.0, ge=1, allow_inf_nan=False)
    max_delay: float = Field(default=20.0, ge=0, allow_inf_nan=False)
    jitter: bool = True


class _NodeSettings(BaseModel):
    """The engine's own node keys (``agent`` is checked on its own, for a better message)."""

    model_config = ConfigDict(extra="ignore")

    map: ExpressionField | None = None
    timeout: float = Field(default=120.0, gt=0, allow_inf_nan=False)
    retry: _Retry = Field(default_factory=lambda: _Retry())
    on_error: Literal["fail", "continue"] = "fail"
    description: str | None = None


class _Edge(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Annotated[list[str], BeforeValidator(_names)] = Field(alias="from")
    target: Annotated[list[str], BeforeValidator(_names)] = Field(alias="to")
    when: str | None = None  # compiled separately, so a bad one does not hide the edge


# --- error messages ----------------------------------------------------------------------------


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string"}.get(type(value), type(value).__name__)


def _fields_of(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _model_at(model: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    for part in loc:
        info = model.model_fields.get(part) if isinstance(part, str) else None
        if info is None:
            return None
        nested = [a for a in (info.annotation, *get_args(info.annotation)) if isinstance(a, type)]
        models = [a for a in nested if issubclass(a, BaseModel)]
        if not models:
            return None
        model = models[0]
    return model


def _message(error: ErrorDetails, model: type[BaseModel] | None, extra: Sequence[str] = ()) -> str:
    kind, message, loc = error["type"], error["msg"], error["loc"]
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden" and loc:
        owner = _model_at(model, loc[:-1]) if model else None
        allowed = [*(extra if len(loc) == 1 else ()), *_fields_of(owner)] if owner else []
        return _unknown("field", str(loc[-1]), allowed)
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    if message.startswith("Input should be "):
        message = "must be " + message[len("Input should be ") :]
    value = error.get("input")
    if isinstance(value, int | float | str | bool) and len(repr(value)) <= 60:
        message += f" (got {value!r})"
    return message


def _unknown(what: str, name: str, known: Sequence[str]) -> str:
    message = f"unknown {what} {name!r}"
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    if known:
        message += f" (known: {', '.join(known)})"
    return message


def _problems(
    exc: ValidationError,
    prefix: Loc,
    model: type[BaseModel] | None,
    extra: Sequence[str] = (),
    rehome: Mapping[str, Loc] | None = None,
) -> list[Problem]:
    """Turn pydantic's errors into problems; ``rehome`` moves errors about values a node took
    from ``defaults`` to the ``defaults`` path, where the user can fix them."""
    problems: list[Problem] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        base: Loc = prefix
        for cut in (2, 1):
            if rehome and len(loc) >= cut and dotted(loc[:cut]) in rehome:
                base = rehome[dotted(loc[:cut])]
                break
        problems.append(Problem(dotted((*base, *loc)), _message(error, model, extra)))
    return problems


# --- building the graph ------------------------------------------------------------------------


@dataclass(slots=True)
class _Built:
    problems: list[Problem]
    nodes: dict[str, Node]
    accepted: set[str]


def build_graph(data: dict[str, Any], registry: Registry, context: ValidationContext | None = None) -> Graph:
    """Validate a parsed graph document against the agent kinds of ``registry``.

    Raises:
        ValidationFailed: listing every problem found, each with its dotted path.
    """
    raw: Any = data
    if not isinstance(raw, dict):
        raise ValidationFailed(
            [Problem("", f"a graph must be a mapping (name, nodes, edges, ...), not {_kind(raw)}")]
        )
    problems: list[Problem] = []
    document: _Document | None = None
    try:
        document = _Document.model_validate(raw)
    except ValidationError as exc:
        problems += _problems(exc, (), _Document)

    name = data.get("name")
    if isinstance(name, str) and not SLUG.fullmatch(name):
        problems.append(Problem("name", f"{name!r} is not a valid graph name: {SLUG_RULE}"))
    schema = data.get("input")
    if isinstance(schema, dict):
        problems += _schema_problems(cast(dict[str, Any], schema))

    raw_nodes: dict[str, Any] = data["nodes"] if isinstance(data.get("nodes"), dict) else {}
    if len(raw_nodes) > MAX_NODES:
        raise ValidationFailed(
            [Problem("nodes", f"{len(raw_nodes)} nodes; a graph may have at most {MAX_NODES}")]
        )
    raw_defaults: dict[str, Any] = data["defaults"] if isinstance(data.get("defaults"), dict) else {}
    if "nodes" in data and isinstance(data["nodes"], dict) and not raw_nodes:
        problems.append(Problem("nodes", "a graph needs at least one node"))
    built = _build_nodes(raw_nodes, raw_defaults, registry, context)
    problems += built.problems
    problems += _defaults_problems(raw_defaults, built.accepted, all_known=len(built.nodes) == len(raw_nodes))

    raw_edges: list[Any] = data["edges"] if isinstance(data.get("edges"), list) else []
    # without a nodes mapping, every edge would point at an "unknown" node: say nothing of them
    node_ids = list(raw_nodes) if isinstance(data.get("nodes"), dict) else None
    links, complete, edge_problems = _links(raw_edges, node_ids)
    problems += edge_problems
    topology = analyse(list(raw_nodes), links)
    for k, cycle in topology.endless:
        problems.append(
            Problem(
                f"edges[{links[k].position}]",
                f"the loop {' -> '.join(cycle)} has no `when` on any of its edges, so it would never "
                "end; add a `when` to the edge that loops back",
            )
        )
    if complete:  # with an edge left out, a node may look unreachable when it is not
        for node_id in topology.unreachable:
            problems.append(
                Problem(
                    f"nodes.{node_id}",
                    f"node {node_id!r} can never run: it is only reached through a loop that no "
                    "entry node leads into; add an edge to it from a node outside the loop",
                )
            )

    problems = _in_document_order(list(dict.fromkeys(problems)), data)  # dict: a bad default once
    if problems or document is None:
        raise ValidationFailed(problems)

    edges = [
        Edge(link.source, link.target, _when(raw_edges[link.position]), k in topology.back, k)
        for k, link in enumerate(links)
    ]
    incoming: dict[str, list[Edge]] = {n: [] for n in built.nodes}
    outgoing: dict[str, list[Edge]] = {n: [] for n in built.nodes}
    for edge in edges:
        outgoing[edge.source].append(edge)
        if not edge.back:
            incoming[edge.target].append(edge)
    return Graph(
        name=document.name,
        nodes=built.nodes,
        edges=edges,
        description=document.description,
        input_schema=document.input,
        max_steps=document.max_steps,
        concurrency=document.concurrency,
        output=document.output,
        spec=copy.deepcopy(data),
        entry=topology.entry,
        incoming=incoming,
        outgoing=outgoing,
        loop_body=topology.loop_body,
        order=topology.order,
    )


def _in_document_order(problems: list[Problem], data: dict[str, Any]) -> list[Problem]:
    """Sort problems by the top-level section they are in, as the document orders them."""
    rank = {key: i for i, key in enumerate(data)}

    def section(problem: Problem) -> int:
        head = problem.path.split(".", 1)[0].split("[", 1)[0]
        return rank.get(head, -1 if not head else len(rank))

    return sorted(problems, key=section)


def parse_graph(
    body: str | bytes | dict[str, Any],
    registry: Registry,
    context: ValidationContext | None = None,
    content_type: str | None = None,
) -> Graph:
    """``load_document`` (unless ``body`` is already a mapping) then ``build_graph``."""
    data = body if isinstance(body, dict) else load_document(body, content_type)
    return build_graph(data, registry, context)


def _schema_problems(schema: dict[str, Any]) -> list[Problem]:
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        path = dotted(("input", *exc.path))
        return [Problem(path, f"not a valid JSON Schema: {exc.message}")]
    return []


def _build_nodes(
    raw_nodes: dict[str, Any], defaults: dict[str, Any], registry: Registry, context: ValidationContext | None
) -> _Built:
    built = _Built([], {}, set())
    for node_id, raw in raw_nodes.items():
        path = f"nodes.{node_id}"
        if not SLUG.fullmatch(node_id):
            built.problems.append(Problem(path, f"{node_id!r} is not a valid node id: {SLUG_RULE}"))
        elif node_id in RESERVED_IDS:
            built.problems.append(
                Problem(
                    path, f"{node_id!r} cannot be a node id: `outputs.{node_id}` would name a method of dicts"
                )
            )
        if not isinstance(raw, dict):
            built.problems.append(
                Problem(path, f"a node must be a mapping with at least `agent`, not {_kind(raw)}")
            )
            continue
        fields = cast(dict[str, Any], raw)
        kind = _agent_kind(fields.get("agent"), registry, f"{path}.agent", built.problems)
        accepted = set(_fields_of(kind.config)) | set(kind.config.model_fields) if kind else set[str]()
        built.accepted |= accepted
        merged, inherited = _merge_defaults(fields, defaults, accepted)
        rehome = {key: ("defaults",) for key in inherited}

        settings: _NodeSettings | None = None
        try:
            settings = _NodeSettings.model_validate({k: v for k, v in merged.items() if k in ENGINE_KEYS})
        except ValidationError as exc:
            built.problems += _problems(exc, ("nodes", node_id), _NodeSettings, rehome=rehome)
        if kind is None:
            continue
        config = None
        try:
            config = kind.config.model_validate(
                {k: v for k, v in merged.items() if k not in ENGINE_KEYS}, context=context
            )
        except ValidationError as exc:
            allowed = [k for k in ENGINE_KEYS if k != "agent"]
            built.problems += _problems(exc, ("nodes", node_id), kind.config, allowed, rehome)
        if settings is not None and config is not None:
            retry = settings.retry
            built.nodes[node_id] = Node(
                id=node_id,
                agent=kind,
                config=config,
                map=settings.map,
                timeout=settings.timeout,
                retry=RetryPolicy(
                    retry.attempts, retry.initial_delay, retry.multiplier, retry.max_delay, retry.jitter
                ),
                on_error=settings.on_error,
                description=settings.description,
            )
    return built


def _agent_kind(name: Any, registry: Registry, path: str, problems: list[Problem]) -> AgentKind | None:
    known = registry.names()
    if name is None:
        problems.append(
            Problem(path, f"required: the agent kind that runs this node, one of: {', '.join(known)}")
        )
        return None
    if not isinstance(name, str):
        problems.append(Problem(path, f"must be the name of an agent kind, one of: {', '.join(known)}"))
        return None
    kind = registry.get(name)
    if kind is None:
        problems.append(Problem(path, _unknown("agent kind", name, known)))
    return kind


def _merge_defaults(
    fields: dict[str, Any], defaults: dict[str, Any], accepted: set[str]
) -> tuple[dict[str, Any], set[str]]:
    """The node's fields over ``defaults`` (``retry`` merged key by key), keeping only defaults
    the node can take; also which keys (``timeout``, ``retry.attempts``) came from defaults."""
    merged = dict(fields)
    inherited: set[str] = set()
    for key, value in defaults.items():
        if key not in DEFAULTABLE and key not in accepted:
            continue
        if key not in merged:
            merged[key] = value
            inherited.add(key)
        elif key == "retry" and isinstance(value, dict) and isinstance(merged[key], dict):
            own = cast(dict[str, Any], merged[key])
            base = cast(dict[str, Any], value)
            merged[key] = {**base, **own}
            inherited |= {f"retry.{k}" for k in base if k not in own}
    return merged, inherited


def _defaults_problems(defaults: dict[str, Any], accepted: set[str], all_known: bool) -> list[Problem]:
    problems: list[Problem] = []
    for key in defaults:
        if key in DEFAULTABLE:
            continue
        if key in ENGINE_KEYS:
            problems.append(Problem(f"defaults.{key}", f"`{key}` cannot be a default; set it on each node"))
        elif all_known and key not in accepted:
            problems.append(
                Problem(
                    f"defaults.{key}", f"no node accepts `{key}`; " + _unknown("field", key, sorted(accepted))
                )
            )
    return problems


def _when(raw: Any) -> Expression | None:
    source = raw.get("when") if isinstance(raw, dict) else None
    return Expression(source) if isinstance(source, str) else None


def _links(raw_edges: list[Any], node_ids: list[str] | None) -> tuple[list[Link], bool, list[Problem]]:
    """Expand the edge sugar (lists in ``from``/``to``) into links, checking each edge (and that
    it joins known nodes, unless ``node_ids`` is None); ``complete`` is False when an edge had to
    be left out."""
    problems: list[Problem] = []
    links: list[Link] = []
    seen: dict[tuple[str, str], int] = {}
    known = set(node_ids or ())
    complete = node_ids is not None
    for i, raw in enumerate(raw_edges):
        path = f"edges[{i}]"
        try:
            _Edge.model_validate(raw)
        except ValidationError as exc:
            problems += _problems(exc, ("edges", i), _Edge)
        if not isinstance(raw, dict):
            complete = False
            continue
        edge = cast(dict[str, Any], raw)
        conditional = edge.get("when") is not None
        if isinstance(edge.get("when"), str):
            try:
                Expression(edge["when"])
            except ExpressionError as exc:
                problems.append(Problem(f"{path}.when", str(exc)))
        ends: list[list[str]] = []
        for side in ("from", "to"):
            try:
                names = _names(edge.get(side))
            except ValueError:
                continue  # reported by the model
            for name in dict.fromkeys(n for n in names if n not in known and node_ids is not None):
                problems.append(Problem(f"{path}.{side}", _unknown("node", name, node_ids or [])))
            if all(n in known for n in names):
                ends.append(names)
        if len(ends) < 2:
            complete = False
            continue
        for source in ends[0]:
            for target in ends[1]:
                if (source, target) in seen:
                    first = seen[(source, target)]
                    problems.append(
                        Problem(
                            path, f"duplicate edge {source} -> {target} (already declared at edges[{first}])"
                        )
                    )
                    continue
                seen[(source, target)] = i
                if len(links) == MAX_EDGES:
                    raise ValidationFailed(
                        [Problem("edges", f"over {MAX_EDGES} edges (lists in from/to counted out)")]
                    )
                links.append(Link(source, target, conditional, i))
    return links, complete, problems
