"""Valid graphs: parsing, edge sugar, loops, defaults, and the two no-I/O agents."""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
import pytest
from pydantic import Field

import agents.template
import agents.wait
from agents.registry import AgentConfig, Registry, agent
from server.engine.context import NodeContext, Resources
from server.errors import ExpressionError, ValidationFailed
from server.graph.fields import TemplateField
from server.graph.model import Graph, RetryPolicy
from server.graph.parse import build_graph, load_document, parse_graph


class EchoConfig(AgentConfig):
    text: TemplateField
    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)


@agent("echo", config=EchoConfig)
async def echo(config: EchoConfig, ctx: NodeContext) -> str:
    return ctx.render(config.text)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    reg.load(agents.template)
    reg.load(agents.wait)
    reg.load(sys.modules[__name__])
    return reg


def context(**variables: Any) -> NodeContext:
    return NodeContext(
        run_id="r1", graph="g", node="n", attempt=1, iteration=0, variables=variables, resources=Resources()
    )


RESEARCH_BRIEF = """
name: research-brief
description: Plan, research in parallel, write, critique until approved.
input:
  type: object
  required: [topic]
  properties: {topic: {type: string}}
defaults:
  timeout: 60
  retry: {attempts: 4, initial_delay: 0.5, multiplier: 2, max_delay: 20, jitter: true}
  model: small-model
max_steps: 50
concurrency: 4
nodes:
  plan:
    agent: template
    value: "{'angles': ['history', 'economics', 'people']}"
  research:
    agent: echo
    map: outputs.plan.angles
    text: "Research {{ item }} of {{ input.topic }}"
  write:
    agent: echo
    text: "{{ outputs.research | join(', ') }}"
    timeout: 300
    retry: {attempts: 1}
  critic:
    agent: template
    value: "{'approved': iteration > 1}"
  publish:
    agent: wait
    seconds: 0
    on_error: continue
edges:
  - {from: plan, to: research}
  - {from: research, to: write}
  - {from: write, to: critic}
  - {from: critic, to: write, when: "not outputs.critic.approved"}
  - {from: critic, to: publish}
output: outputs.write
"""


def pairs(graph: Graph) -> list[tuple[str, str, bool]]:
    return [(e.source, e.target, e.back) for e in graph.edges]


def graph_of(registry: Registry, nodes: dict[str, Any], edges: list[Any], **extra: Any) -> Graph:
    return build_graph({"name": "g", "nodes": nodes, "edges": edges, **extra}, registry)


def t(text: str = "x") -> dict[str, Any]:
    return {"agent": "template", "template": text}


# --- the DESIGN.md example ----------------------------------------------------------------------


def test_design_example_parses_with_its_topology(registry: Registry) -> None:
    graph = parse_graph(RESEARCH_BRIEF, registry, content_type="application/yaml")

    assert graph.name == "research-brief"
    assert graph.description == "Plan, research in parallel, write, critique until approved."
    assert graph.max_steps == 50
    assert graph.concurrency == 4
    assert graph.input_schema == {
        "type": "object",
        "required": ["topic"],
        "properties": {"topic": {"type": "string"}},
    }
    assert list(graph.nodes) == ["plan", "research", "write", "critic", "publish"]
    assert pairs(graph) == [
        ("plan", "research", False),
        ("research", "write", False),
        ("write", "critic", False),
        ("critic", "write", True),
        ("critic", "publish", False),
    ]
    loop = graph.back_edges[0]
    assert loop.when is not None
    assert loop.when.evaluate({"outputs": {"critic": {"approved": False}}}) is True
    assert graph.entry == ["plan"]
    assert graph.loop_body == {loop.index: frozenset({"write", "critic"})}
    assert graph.order == ["plan", "research", "write", "critic", "publish"]
    assert [e.source for e in graph.incoming["write"]] == ["research"]  # back edge set aside
    assert [(e.target, e.back) for e in graph.outgoing["critic"]] == [("write", True), ("publish", False)]
    assert graph.incoming["plan"] == []
    assert graph.output is not None
    assert graph.output.evaluate({"outputs": {"write": "text"}}) == "text"


def test_design_example_node_settings(registry: Registry) -> None:
    graph = parse_graph(RESEARCH_BRIEF, registry, content_type="application/yaml")
    research, write, publish = graph.nodes["research"], graph.nodes["write"], graph.nodes["publish"]

    assert research.agent.name == "echo"
    assert research.map is not None
    assert research.map.source == "outputs.plan.angles"
    assert isinstance(research.config, EchoConfig)
    assert research.config.model == "small-model"  # from defaults: echo has a `model` field
    assert research.timeout == 60
    assert research.retry == RetryPolicy(
        attempts=4, initial_delay=0.5, multiplier=2, max_delay=20, jitter=True
    )
    assert write.timeout == 300
    assert write.retry.attempts == 1
    assert write.retry.max_delay == 20  # the rest of retry still comes from defaults
    assert publish.on_error == "continue"
    assert graph.nodes["plan"].on_error == "fail"


def test_spec_is_the_document_as_submitted(registry: Registry) -> None:
    document = load_document(RESEARCH_BRIEF, "application/yaml")
    graph = build_graph(document, registry)

    assert graph.spec == document
    assert json.loads(json.dumps(graph.spec)) == document
    document["nodes"]["plan"]["agent"] = "changed"
    assert graph.spec["nodes"]["plan"]["agent"] == "template"


def test_json_and_yaml_give_the_same_graph(registry: Registry) -> None:
    document = load_document(RESEARCH_BRIEF, "application/yaml")
    as_json = json.dumps(document)

    assert load_document(as_json) == document
    assert load_document(as_json.encode(), "application/json") == document
    assert load_document(RESEARCH_BRIEF.encode()) == document  # no content type: JSON, then YAML
    assert pairs(parse_graph(as_json, registry)) == pairs(parse_graph(RESEARCH_BRIEF, registry))


def test_yaml_dates_and_keys_stay_plain_strings() -> None:
    document = load_document("name: g\ndescription: 2024-01-01\n", "application/yaml")
    assert document == {"name": "g", "description": "2024-01-01"}


def test_minimal_graph_uses_engine_defaults(registry: Registry) -> None:
    graph = build_graph({"name": "one", "nodes": {"only": t()}}, registry)

    assert graph.edges == []
    assert graph.entry == ["only"]
    assert graph.order == ["only"]
    assert graph.max_steps == 200
    assert graph.concurrency == 16
    assert graph.output is None
    node = graph.nodes["only"]
    assert node.timeout == 120
    assert node.retry == RetryPolicy()
    assert node.on_error == "fail"


# --- edge sugar ---------------------------------------------------------------------------------


def test_edge_lists_expand_to_one_edge_per_pair_in_order(registry: Registry) -> None:
    nodes = {n: t() for n in ("a", "b", "c", "d", "e")}
    graph = graph_of(
        registry,
        nodes,
        [{"from": "a", "to": ["b", "c"]}, {"from": ["b", "c"], "to": ["d", "e"]}],
    )

    assert [(e.source, e.target) for e in graph.edges] == [
        ("a", "b"),
        ("a", "c"),
        ("b", "d"),
        ("b", "e"),
        ("c", "d"),
        ("c", "e"),
    ]
    assert [e.index for e in graph.edges] == list(range(6))
    assert graph.entry == ["a"]
    assert [e.source for e in graph.incoming["d"]] == ["b", "c"]
    assert graph.order == ["a", "b", "c", "d", "e"]


def test_sugar_keeps_when_on_every_expanded_edge(registry: Registry) -> None:
    nodes = {n: t() for n in ("a", "b", "c")}
    graph = graph_of(registry, nodes, [{"from": "a", "to": ["b", "c"], "when": "input.go"}])

    assert all(e.when is not None and e.when.source == "input.go" for e in graph.edges)


# --- loops --------------------------------------------------------------------------------------


def test_nested_loops(registry: Registry) -> None:
    nodes = {n: t() for n in ("start", "draft", "check", "fix", "review", "done")}
    graph = graph_of(
        registry,
        nodes,
        [
            {"from": "start", "to": "draft"},
            {"from": "draft", "to": "check"},
            {"from": "check", "to": "fix"},
            {"from": "fix", "to": "check", "when": "not outputs.fix"},  # inner loop
            {"from": "fix", "to": "review"},
            {"from": "review", "to": "draft", "when": "not outputs.review"},  # outer loop
            {"from": "review", "to": "done"},
        ],
    )

    inner, outer = graph.back_edges
    assert (inner.source, inner.target) == ("fix", "check")
    assert (outer.source, outer.target) == ("review", "draft")
    assert graph.loop_body[inner.index] == {"check", "fix"}
    assert graph.loop_body[outer.index] == {"draft", "check", "fix", "review"}
    assert graph.entry == ["start"]
    assert graph.order == ["start", "draft", "check", "fix", "review", "done"]


def test_loop_inside_a_fan_out(registry: Registry) -> None:
    nodes = {n: t() for n in ("split", "left", "refine", "right", "join")}
    graph = graph_of(
        registry,
        nodes,
        [
            {"from": "split", "to": ["left", "right"]},
            {"from": "left", "to": "refine"},
            {"from": "refine", "to": "left", "when": "outputs.refine == 'again'"},
            {"from": ["refine", "right"], "to": "join"},
        ],
    )

    assert [(e.source, e.target) for e in graph.back_edges] == [("refine", "left")]
    assert graph.loop_body[graph.back_edges[0].index] == {"left", "refine"}
    assert [e.source for e in graph.incoming["join"]] == ["refine", "right"]
    assert [e.source for e in graph.incoming["left"]] == ["split"]
    assert graph.entry == ["split"]


def test_loop_body_includes_every_path_between_target_and_source(registry: Registry) -> None:
    nodes = {n: t() for n in ("a", "b", "c", "d", "after")}
    graph = graph_of(
        registry,
        nodes,
        [
            {"from": "a", "to": ["b", "c"]},
            {"from": ["b", "c"], "to": "d"},
            {"from": "d", "to": "a", "when": "iteration < 3"},
            {"from": "d", "to": "after"},
        ],
    )

    back = graph.back_edges
    assert [(e.source, e.target) for e in back] == [("d", "a")]
    assert graph.loop_body[back[0].index] == {"a", "b", "c", "d"}


def test_self_loop_with_when(registry: Registry) -> None:
    graph = graph_of(
        registry,
        {"poll": t(), "next": t()},
        [{"from": "poll", "to": "poll", "when": "iteration < 5"}, {"from": "poll", "to": "next"}],
    )

    (loop,) = graph.back_edges
    assert (loop.source, loop.target) == ("poll", "poll")
    assert graph.loop_body[loop.index] == {"poll"}
    assert graph.entry == ["poll"]


def test_graph_made_only_of_a_loop_starts_at_the_first_node(registry: Registry) -> None:
    graph = graph_of(
        registry,
        {"ask": t(), "answer": t()},
        [{"from": "ask", "to": "answer"}, {"from": "answer", "to": "ask", "when": "true"}],
    )

    assert pairs(graph) == [("ask", "answer", False), ("answer", "ask", True)]
    assert graph.entry == ["ask"]


def test_loop_closed_by_a_conditional_forward_edge_is_accepted(registry: Registry) -> None:
    # The back edge has no `when`, but the loop can still end: `b` is skipped when a -> b is false.
    graph = graph_of(
        registry,
        {"a": t(), "b": t()},
        [{"from": "a", "to": "b", "when": "iteration < 2"}, {"from": "b", "to": "a"}],
    )

    assert pairs(graph) == [("a", "b", False), ("b", "a", True)]


def test_entry_nodes_start_together(registry: Registry) -> None:
    nodes = {"x": t(), "y": t(), "both": t()}
    graph = graph_of(registry, nodes, [{"from": ["x", "y"], "to": "both"}])

    assert graph.entry == ["x", "y"]


# --- defaults -----------------------------------------------------------------------------------


def test_defaults_apply_only_where_the_node_accepts_them(registry: Registry) -> None:
    graph = graph_of(
        registry,
        {
            "a": {"agent": "echo", "text": "hi", "retry": {"initial_delay": 1}},
            "b": {"agent": "echo", "text": "hi", "temperature": 1.5, "timeout": 5, "on_error": "fail"},
            "c": t(),
        },
        [],
        defaults={"timeout": 30, "on_error": "continue", "retry": {"attempts": 5}, "temperature": 0.3},
    )
    a, b, c = graph.nodes["a"], graph.nodes["b"], graph.nodes["c"]

    assert isinstance(a.config, EchoConfig)
    assert isinstance(b.config, EchoConfig)
    assert (a.timeout, a.on_error, a.config.temperature) == (30, "continue", 0.3)
    assert a.retry == RetryPolicy(attempts=5, initial_delay=1)
    assert (b.timeout, b.on_error, b.config.temperature) == (5, "fail", 1.5)
    assert b.retry == RetryPolicy(attempts=5)
    # `template` has no `temperature` field, so the default is not passed to it
    assert (c.timeout, c.on_error) == (30, "continue")


# --- the template agent -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_template_agent_renders_its_template(registry: Registry) -> None:
    kind = registry.get("template")
    assert kind is not None
    config = kind.config.model_validate({"template": "Hello {{ input.name }}, pass {{ iteration }}"})

    assert await kind.run(config, context(input={"name": "Ada"}, iteration=2)) == "Hello Ada, pass 2"


@pytest.mark.anyio
async def test_template_agent_value_keeps_the_type(registry: Registry) -> None:
    kind = registry.get("template")
    assert kind is not None
    config = kind.config.model_validate(
        {"value": "{'count': outputs.numbers | length, 'first': outputs.numbers[0]}"}
    )

    output = await kind.run(config, context(outputs={"numbers": [3, 4]}))

    assert output == {"count": 2, "first": 3}


@pytest.mark.anyio
async def test_template_agent_reports_undefined_values(registry: Registry) -> None:
    kind = registry.get("template")
    assert kind is not None
    config = kind.config.model_validate({"template": "{{ input.missing }}"})

    with pytest.raises(ExpressionError, match="missing"):
        await kind.run(config, context(input={}))


@pytest.mark.parametrize("fields", [{}, {"template": "a", "value": "1"}])
def test_template_agent_needs_exactly_one_of_template_and_value(
    registry: Registry, fields: dict[str, Any]
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        graph_of(registry, {"say": {"agent": "template", **fields}}, [])

    (problem,) = caught.value.problems
    assert problem.path == "nodes.say"
    assert "exactly one of `template`" in problem.message


# --- the wait agent -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_wait_agent_outputs_the_seconds(registry: Registry) -> None:
    kind = registry.get("wait")
    assert kind is not None
    config = kind.config.model_validate({"seconds": 0})

    assert await kind.run(config, context()) == {"waited": 0.0}


@pytest.mark.anyio
async def test_wait_agent_is_cancellable(registry: Registry) -> None:
    kind = registry.get("wait")
    assert kind is not None
    config = kind.config.model_validate({"seconds": 3600})
    results: list[Any] = []

    async def run() -> None:
        results.append(await kind.run(config, context()))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await anyio.wait_all_tasks_blocked()  # the wait is asleep now
        tg.cancel_scope.cancel()

    assert results == []
    assert tg.cancel_scope.cancel_called
