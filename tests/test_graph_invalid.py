"""Invalid graphs: every mistake is reported with its path and a message that says what to fix."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from pydantic import Field

import agents.template
import agents.wait
from agents.registry import AgentConfig, Registry, agent
from server.engine.context import NodeContext
from server.errors import Problem, ValidationFailed
from server.graph.fields import TemplateField
from server.graph.parse import build_graph, load_document, parse_graph


class EchoConfig(AgentConfig):
    prompt: TemplateField
    temperature: float | None = Field(default=None, ge=0, le=2)


@agent("echo", config=EchoConfig)
async def echo(config: EchoConfig, ctx: NodeContext) -> str:
    return ctx.render(config.prompt)


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    reg.load(agents.template)
    reg.load(agents.wait)
    reg.load(sys.modules[__name__])
    return reg


def t(text: str = "x") -> dict[str, Any]:
    return {"agent": "template", "template": text}


def problems_of(registry: Registry, document: dict[str, Any]) -> list[Problem]:
    with pytest.raises(ValidationFailed) as caught:
        build_graph(document, registry)
    return caught.value.problems


def problems_at(registry: Registry, document: dict[str, Any], path: str) -> list[str]:
    """The messages at ``path``; fails if there is none."""
    problems = problems_of(registry, document)
    messages = [p.message for p in problems if p.path == path]
    assert messages, f"no problem at {path!r}; got {problems}"
    return messages


def doc(nodes: dict[str, Any] | None = None, edges: list[Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"name": "g", "nodes": nodes or {"a": t(), "b": t()}, "edges": edges or [], **extra}


def load_problems(body: str, content_type: str | None = None) -> list[Problem]:
    with pytest.raises(ValidationFailed) as caught:
        load_document(body, content_type)
    return caught.value.problems


# --- reading the document ----------------------------------------------------------------------


def test_yaml_syntax_error_gives_the_line() -> None:
    (problem,) = load_problems("name: g\nnodes:\n  a: {agent: template\n  b: x\n", "application/yaml")
    assert problem.path == ""
    assert problem.message.startswith("invalid YAML at line ")


def test_json_syntax_error_gives_line_and_column() -> None:
    (problem,) = load_problems('{\n  "name": "g",\n  "nodes": }', "application/json")
    assert problem.message.startswith("invalid JSON at line 3, column 12")


def test_broken_json_without_content_type_reports_the_json_error() -> None:
    (problem,) = load_problems('{"name": "g", "nodes": {"a": 1}')
    assert "invalid JSON" in problem.message


@pytest.mark.parametrize(
    ("body", "what"), [("- a\n- b\n", "a list"), ("", "nothing"), ("just text", "a string")]
)
def test_document_must_be_a_mapping(body: str, what: str) -> None:
    (problem,) = load_problems(body)
    assert problem.message == f"a graph must be a mapping (name, nodes, edges, ...), not {what}"


def test_duplicate_node_in_yaml() -> None:
    body = (
        "name: g\nnodes:\n  write: {agent: template, template: a}\n  write: {agent: template, template: b}\n"
    )
    (problem,) = load_problems(body, "application/yaml")
    assert problem.path == "nodes.write"
    assert "node 'write' is declared twice" in problem.message
    assert "line 4" in problem.message
    assert "first at line 3" in problem.message


def test_duplicate_node_in_json() -> None:
    body = '{"name": "g", "nodes": {"write": {"agent": "wait"}, "write": {"agent": "wait"}}}'
    (problem,) = load_problems(body, "application/json")
    assert problem.path == "nodes.write"
    assert "declared twice" in problem.message


def test_duplicate_key_inside_an_edge() -> None:
    (problem,) = load_problems("name: g\nedges:\n  - {from: a, to: b, to: c}\n", "application/yaml")
    assert problem.path == "edges[0].to"
    assert "appears twice" in problem.message


def test_yaml_key_that_is_not_a_string() -> None:
    (problem,) = load_problems("name: g\nnodes:\n  yes: {agent: wait, seconds: 1}\n", "application/yaml")
    assert problem.path == "nodes.yes"
    assert "as a bool" in problem.message
    assert "quote it" in problem.message


def test_yaml_alias_bomb_is_refused() -> None:
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 8)]
    (problem,) = load_problems("\n".join(lines), "application/yaml")
    assert "over 100000 values" in problem.message


# --- top level ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Research Brief", "-start", "UPPER", "a" * 65, "dot.ted"])
def test_bad_graph_name(registry: Registry, name: str) -> None:
    (message,) = problems_at(registry, doc(name=name), "name")
    assert "not a valid graph name" in message
    assert "lowercase letters" in message


def test_missing_name_and_nodes(registry: Registry) -> None:
    problems = problems_of(registry, {"description": "nothing else"})
    assert Problem("name", "required") in problems
    assert Problem("nodes", "required") in problems


def test_nodes_written_as_a_list(registry: Registry) -> None:
    problems = problems_of(registry, doc(edges=[{"from": "a", "to": "b"}]) | {"nodes": [{"id": "a"}]})
    assert problems == [Problem("nodes", "must be a valid dictionary")]


def test_no_nodes(registry: Registry) -> None:
    assert problems_at(registry, doc() | {"nodes": {}}, "nodes") == ["a graph needs at least one node"]


def test_unknown_top_level_field(registry: Registry) -> None:
    (message,) = problems_at(registry, doc(edge=[]), "edge")
    assert message.startswith("unknown field 'edge'; did you mean 'edges'?")
    assert "max_steps" in message


@pytest.mark.parametrize("field", ["max_steps", "concurrency"])
def test_limits_must_be_at_least_one(registry: Registry, field: str) -> None:
    (message,) = problems_at(registry, doc() | {field: 0}, field)
    assert message == "must be greater than or equal to 1 (got 0)"


def test_output_must_compile(registry: Registry) -> None:
    (message,) = problems_at(registry, doc(output="outputs.a +"), "output")
    assert "invalid expression 'outputs.a +'" in message


def test_input_must_be_a_json_schema(registry: Registry) -> None:
    schema = {"type": "object", "properties": {"topic": {"type": "text"}}}
    (message,) = problems_at(registry, doc(input=schema), "input.properties.topic.type")
    assert message.startswith("not a valid JSON Schema:")
    assert "'text'" in message


# --- nodes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("node_id", ["Write", "my node", "_x"])
def test_bad_node_id(registry: Registry, node_id: str) -> None:
    (message,) = problems_at(registry, doc({node_id: t()}), f"nodes.{node_id}")
    assert "not a valid node id" in message


def test_unknown_agent_kind_lists_the_known_ones(registry: Registry) -> None:
    (message,) = problems_at(registry, doc({"a": {"agent": "templte"}}), "nodes.a.agent")
    assert message == "unknown agent kind 'templte'; did you mean 'template'? (known: echo, template, wait)"


def test_missing_agent(registry: Registry) -> None:
    (message,) = problems_at(registry, doc({"a": {"template": "x"}}), "nodes.a.agent")
    assert message.startswith("required")
    assert "echo, template, wait" in message


def test_node_must_be_a_mapping(registry: Registry) -> None:
    (message,) = problems_at(registry, doc({"a": "template"}), "nodes.a")
    assert "a node must be a mapping" in message


def test_agent_fields_are_validated_by_the_kind(registry: Registry) -> None:
    nodes = {
        "a": {"agent": "echo", "prompt": "{{ input.x "},
        "b": {"agent": "wait", "seconds": -1},
        "c": {"agent": "echo"},
        "d": {"agent": "wait", "seconds": 100_000},
    }
    problems = problems_of(registry, doc(nodes))
    by_path = {p.path: p.message for p in problems}

    assert "invalid template" in by_path["nodes.a.prompt"]
    assert by_path["nodes.b.seconds"] == "must be greater than or equal to 0 (got -1)"
    assert by_path["nodes.c.prompt"] == "required"
    assert by_path["nodes.d.seconds"] == "must be less than or equal to 86400 (got 100000)"


def test_unknown_node_field_suggests_the_right_one(registry: Registry) -> None:
    (message,) = problems_at(registry, doc({"a": {"agent": "echo", "promt": "hi"}}), "nodes.a.promt")
    assert message.startswith("unknown field 'promt'; did you mean 'prompt'?")
    assert "timeout" in message  # the engine's keys are listed too


def test_bad_map_expression(registry: Registry) -> None:
    (message,) = problems_at(registry, doc({"a": t() | {"map": "outputs.plan["}}), "nodes.a.map")
    assert "invalid expression" in message


@pytest.mark.parametrize("timeout", [0, -5])
def test_timeout_must_be_positive(registry: Registry, timeout: float) -> None:
    (message,) = problems_at(registry, doc({"a": t() | {"timeout": timeout}}), "nodes.a.timeout")
    assert message == f"must be greater than 0 (got {timeout})"


@pytest.mark.parametrize(
    ("retry", "path", "message"),
    [
        ({"attempts": 0}, "attempts", "must be greater than or equal to 1 (got 0)"),
        ({"initial_delay": -1}, "initial_delay", "must be greater than or equal to 0 (got -1)"),
        ({"multiplier": 0.5}, "multiplier", "must be greater than or equal to 1 (got 0.5)"),
        ({"max_delay": -1}, "max_delay", "must be greater than or equal to 0 (got -1)"),
        ({"tries": 3}, "tries", "unknown field 'tries'"),
    ],
)
def test_retry_values_out_of_range(
    registry: Registry, retry: dict[str, Any], path: str, message: str
) -> None:
    (found,) = problems_at(registry, doc({"a": t() | {"retry": retry}}), f"nodes.a.retry.{path}")
    assert found.startswith(message)


def test_on_error_is_fail_or_continue(registry: Registry) -> None:
    (message,) = problems_at(registry, doc({"a": t() | {"on_error": "ignore"}}), "nodes.a.on_error")
    assert message == "must be 'fail' or 'continue' (got 'ignore')"


# --- defaults ----------------------------------------------------------------------------------


def test_a_bad_default_is_reported_once_at_defaults(registry: Registry) -> None:
    problems = problems_of(registry, doc(defaults={"timeout": 0, "retry": {"attempts": 0}}))

    assert problems == [
        Problem("defaults.timeout", "must be greater than 0 (got 0)"),
        Problem("defaults.retry.attempts", "must be greater than or equal to 1 (got 0)"),
    ]


def test_a_bad_kind_default_points_at_defaults(registry: Registry) -> None:
    nodes = {"a": {"agent": "echo", "prompt": "x"}, "b": {"agent": "echo", "prompt": "y"}}
    problems = problems_of(registry, doc(nodes, defaults={"temperature": 9}))
    assert problems == [Problem("defaults.temperature", "must be less than or equal to 2 (got 9)")]


def test_a_default_no_node_accepts(registry: Registry) -> None:
    (message,) = problems_at(
        registry,
        doc({"a": {"agent": "echo", "prompt": "x"}}, defaults={"temprature": 1}),
        "defaults.temprature",
    )
    assert "no node accepts `temprature`" in message
    assert "did you mean 'temperature'?" in message


def test_engine_keys_that_cannot_be_defaults(registry: Registry) -> None:
    (message,) = problems_at(registry, doc(defaults={"agent": "template"}), "defaults.agent")
    assert message == "`agent` cannot be a default; set it on each node"


# --- edges -------------------------------------------------------------------------------------


def test_edges_to_unknown_nodes(registry: Registry) -> None:
    problems = problems_of(
        registry, doc(edges=[{"from": "a", "to": "c"}, {"from": ["a", "plan"], "to": "b"}])
    )

    assert Problem("edges[0].to", "unknown node 'c' (known: a, b)") in problems
    assert Problem("edges[1].from", "unknown node 'plan' (known: a, b)") in problems


def test_edge_shape(registry: Registry) -> None:
    problems = problems_of(
        registry,
        doc(edges=[{"from": "a"}, {"from": 3, "to": []}, "a -> b", {"from": "a", "to": "b", "if": "x"}]),
    )
    by_path = {p.path: p.message for p in problems}

    assert by_path["edges[0].to"] == "required"
    assert by_path["edges[1].from"] == "must be a node id or a non-empty list of node ids"
    assert by_path["edges[1].to"] == "must be a node id or a non-empty list of node ids"
    assert by_path["edges[2]"].startswith("must be a valid dictionary")
    assert by_path["edges[3].if"].startswith("unknown field 'if'")


def test_when_must_compile(registry: Registry) -> None:
    (message,) = problems_at(
        registry, doc(edges=[{"from": "a", "to": "b", "when": "outputs.a =="}]), "edges[0].when"
    )
    assert "invalid expression" in message


def test_duplicate_edge(registry: Registry) -> None:
    edges = [{"from": "a", "to": "b"}, {"from": ["a"], "to": ["b"]}]
    (message,) = problems_at(registry, doc(edges=edges), "edges[1]")
    assert message == "duplicate edge a -> b (already declared at edges[0])"


def test_cycle_without_when_names_the_loop(registry: Registry) -> None:
    nodes = {n: t() for n in ("plan", "research", "write", "critic", "publish")}
    edges = [
        {"from": "plan", "to": "research"},
        {"from": "research", "to": "write"},
        {"from": "write", "to": "critic"},
        {"from": "critic", "to": "publish"},
        {"from": "critic", "to": "write"},
    ]
    (message,) = problems_at(registry, doc(nodes, edges), "edges[4]")
    assert message.startswith("the loop write -> critic -> write has no `when` on any of its edges")
    assert "add a `when`" in message


def test_self_loop_without_when(registry: Registry) -> None:
    (message,) = problems_at(
        registry, doc(edges=[{"from": "a", "to": "b"}, {"from": "b", "to": "b"}]), "edges[1]"
    )
    assert message.startswith("the loop b -> b has no `when`")


def test_every_endless_loop_is_reported(registry: Registry) -> None:
    nodes = {n: t() for n in ("a", "b", "c", "d")}
    edges = [
        {"from": "a", "to": "b"},
        {"from": "b", "to": "a"},
        {"from": "b", "to": "c"},
        {"from": "c", "to": "d"},
        {"from": "d", "to": "c"},
    ]
    problems = problems_of(registry, doc(nodes, edges))
    assert [p.path for p in problems] == ["edges[1]", "edges[4]"]


def test_node_only_reachable_through_a_loop_can_never_run(registry: Registry) -> None:
    nodes = {"start": t(), "ping": t(), "pong": t()}
    edges = [{"from": "ping", "to": "pong"}, {"from": "pong", "to": "ping", "when": "iteration < 3"}]
    problems = problems_of(registry, doc(nodes, edges))

    assert [p.path for p in problems] == ["nodes.ping", "nodes.pong"]
    assert "node 'ping' can never run" in problems[0].message


# --- many at once ------------------------------------------------------------------------------


def test_every_mistake_is_reported_at_once(registry: Registry) -> None:
    body = """
name: Bad Name
max_steps: 0
input: {type: objekt}
nodes:
  plan: {agent: llm, prompt: hi}
  write: {agent: echo, prompt: "{{ outputs.plan ", timeout: 0, retry: {attempts: 0}, on_error: ignore}
  critic: {agent: template, template: ok, map: "[1,"}
  pause: {agent: wait}
edges:
  - {from: plan, to: write}
  - {from: write, to: critic}
  - {from: critic, to: write}
  - {from: critic, to: publish, when: "outputs.critic.approved and"}
output: "outputs.write |"
"""
    with pytest.raises(ValidationFailed) as caught:
        parse_graph(body, registry, content_type="application/yaml")
    paths = {p.path for p in caught.value.problems}

    assert paths == {
        "name",
        "max_steps",
        "input.type",
        "nodes.plan.agent",
        "nodes.write.prompt",
        "nodes.write.timeout",
        "nodes.write.retry.attempts",
        "nodes.write.on_error",
        "nodes.critic.map",
        "nodes.pause.seconds",
        "edges[2]",
        "edges[3].to",
        "edges[3].when",
        "output",
    }
    assert "invalid graph: name:" in str(caught.value)
    assert "(and 9 more)" in str(caught.value)


def test_a_node_id_that_shadows_a_dict_method_is_refused(registry: Registry) -> None:
    messages = problems_at(registry, doc({"items": t()}), "nodes.items")
    assert any("outputs.items" in m for m in messages)


# --- documents that are not JSON data, and limits ---------------------------------------------


@pytest.mark.parametrize(
    ("body", "path", "message"),
    [
        (
            "name: g\ndescription: !!binary aGVsbG8=\nnodes: {a: {agent: template, template: x}}\n",
            "description",
            "bytes value is not JSON data",
        ),
        (
            "name: g\nnodes: {a: {agent: template, template: x, extra: !!set {p, q}}}\n",
            "nodes.a.extra",
            "set value is not JSON data",
        ),
        ("name: g\nnodes: {a: {agent: wait, seconds: .inf}}\n", "nodes.a.seconds", "not a JSON number"),
        (
            '{"name": "g", "nodes": {"a": {"agent": "wait", "seconds": NaN}}}',
            "nodes.a.seconds",
            "not a JSON number",
        ),
        (
            '{"name": "g", "description": "\\ud800", "nodes": {"a": {"agent": "wait", "seconds": 1}}}',
            "description",
            "not valid Unicode",
        ),
    ],
)
def test_values_that_are_not_json_data_are_refused_with_their_path(
    body: str, path: str, message: str
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        load_document(body)
    problems = caught.value.problems
    assert [p.path for p in problems] == [path]
    assert message in problems[0].message


@pytest.mark.parametrize(
    ("field", "source"),
    [
        ("template", "{% if 1 %}" * 300 + "{% endif %}" * 300),
        ("template", "{{ " + "[" * 200 + "]" * 200 + " }}"),
    ],
)
def test_a_template_nested_too_deeply_is_a_problem_not_a_crash(
    registry: Registry, field: str, source: str
) -> None:
    messages = problems_at(registry, doc({"a": {"agent": "template", field: source}}), f"nodes.a.{field}")
    assert any("nested too deeply" in m for m in messages)


def test_an_expression_nested_too_deeply_is_a_problem_not_a_crash(registry: Registry) -> None:
    messages = problems_at(registry, doc(output="(" * 500 + "1" + ")" * 500), "output")
    assert any("nested too deeply" in m for m in messages)


def test_too_many_nodes(registry: Registry) -> None:
    from server.graph.parse import MAX_NODES

    nodes = {f"n{i}": t() for i in range(MAX_NODES + 1)}
    messages = problems_at(registry, doc(nodes), "nodes")
    assert messages == [f"{MAX_NODES + 1} nodes; a graph may have at most {MAX_NODES}"]


def test_too_many_edges_after_the_list_sugar(registry: Registry) -> None:
    from server.graph.parse import MAX_EDGES

    side = int(MAX_EDGES**0.5) + 1  # side * side edges from one entry
    nodes = {f"a{i}": t() for i in range(side)} | {f"b{i}": t() for i in range(side)}
    edge = {"from": [f"a{i}" for i in range(side)], "to": [f"b{i}" for i in range(side)]}
    messages = problems_at(registry, doc(nodes, [edge]), "edges")
    assert "over 20000 edges" in messages[0]


def test_a_graph_at_the_node_limit_validates_in_linear_time(registry: Registry) -> None:
    """A chain at the node limit: its loop and cycle checks are linear (they were quadratic)."""
    from server.graph.parse import MAX_NODES

    nodes = {f"n{i}": t(f"step {i}") for i in range(MAX_NODES)}
    edges = [{"from": f"n{i}", "to": f"n{i + 1}"} for i in range(MAX_NODES - 1)]
    graph = build_graph(doc(nodes, edges), registry)
    assert graph.order[0] == "n0"
    assert graph.order[-1] == f"n{MAX_NODES - 1}"
    assert [e.target for e in graph.outgoing["n0"]] == ["n1"]
    assert [e.source for e in graph.incoming[f"n{MAX_NODES - 1}"]] == [f"n{MAX_NODES - 2}"]
