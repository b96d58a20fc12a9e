"""The execution engine, rule by rule (DESIGN.md "Execution semantics"), with small test kinds."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, cast

import anyio
import anyio.lowlevel
import pytest

from agents.registry import AgentConfig, Registry, agent
from server.engine import Engine, MemoryRecorder, NodeContext, Resources, RunHandle, RunInfo, RunState
from server.engine import engine as engine_module
from server.engine.engine import RecordTimeout
from server.engine.records import NodeExecution, RunUpdate
from server.errors import NodeError, RetryableError
from server.events import Event
from server.graph.fields import ExpressionField
from server.graph.model import Graph
from server.graph.parse import build_graph
from server.status import EventType, NodeStatus, RunStatus

FAST_RETRY = {"attempts": 3, "initial_delay": 0, "multiplier": 1, "max_delay": 0, "jitter": False}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- test kinds --------------------------------------------------------------------------------


class Tally:
    """What the test kinds did: calls per node, gates they open and wait on, nodes in flight."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.order: list[str] = []
        self.running = 0
        self.most_running = 0
        self._gates: dict[str, anyio.Event] = {}

    def gate(self, name: str) -> anyio.Event:
        if name not in self._gates:
            self._gates[name] = anyio.Event()
        return self._gates[name]

    def enter(self, ctx: NodeContext) -> None:
        self.calls[ctx.node] += 1
        self.order.append(ctx.node)


def tally_of(ctx: NodeContext) -> Tally:
    found = ctx.resources.find(Tally)
    return found if found is not None else Tally()


class EchoConfig(AgentConfig):
    value: ExpressionField | None = None
    deltas: list[str] = []
    tokens: int = 0


@agent("echo", config=EchoConfig)
async def echo(config: EchoConfig, ctx: NodeContext) -> Any:
    tally_of(ctx).enter(ctx)
    for text in config.deltas:
        await ctx.delta(text)
    if config.tokens:
        ctx.add_usage({"prompt_tokens": config.tokens, "total_tokens": config.tokens})
    return ctx.evaluate(config.value) if config.value is not None else ctx.node


class FailConfig(AgentConfig):
    times: int = 1_000_000
    retryable: bool = False
    message: str = "boom"
    error: str = "node"  # node | value | forever (blocks: a timeout)
    wait: str | None = None


@agent("fail", config=FailConfig)
async def fail(config: FailConfig, ctx: NodeContext) -> Any:
    tally = tally_of(ctx)
    tally.enter(ctx)
    if config.wait:
        await tally.gate(config.wait).wait()
    if ctx.attempt > config.times:
        return f"ok after {ctx.attempt}"
    if config.error == "forever":
        await anyio.sleep_forever()
    if config.error == "value":
        raise ValueError(config.message)
    raise NodeError(config.message, retryable=config.retryable)


class GateConfig(AgentConfig):
    open: list[str] = []
    wait: ExpressionField | None = None  # the name of a gate to wait on
    value: ExpressionField | None = None


@agent("gate", config=GateConfig)
async def gate(config: GateConfig, ctx: NodeContext) -> Any:
    """Opens gates, then waits on one (a gate nobody opens blocks forever)."""
    tally = tally_of(ctx)
    tally.enter(ctx)
    for name in config.open:
        tally.gate(name).set()
    if config.wait is not None:
        name = ctx.evaluate(config.wait)
        if name is not None:
            await tally.gate(str(name)).wait()
    return ctx.evaluate(config.value) if config.value is not None else ctx.node


class BusyConfig(AgentConfig):
    checkpoints: int = 20


@agent("busy", config=BusyConfig)
async def busy(config: BusyConfig, ctx: NodeContext) -> Any:
    """Yields to the event loop a few times while counting how many nodes are in flight."""
    tally = tally_of(ctx)
    tally.enter(ctx)
    tally.running += 1
    tally.most_running = max(tally.most_running, tally.running)
    try:
        for _ in range(config.checkpoints):
            await anyio.lowlevel.checkpoint()
    finally:
        tally.running -= 1
    return ctx.node


REGISTRY = Registry([echo.__braid_agent__, fail.__braid_agent__, gate.__braid_agent__, busy.__braid_agent__])  # type: ignore[attr-defined]


# --- helpers -----------------------------------------------------------------------------------


def make_graph(nodes: dict[str, Any], edges: list[dict[str, Any]] | None = None, **extra: Any) -> Graph:
    spec: dict[str, Any] = {"name": "test", "nodes": nodes, "edges": edges or [], **extra}
    spec.setdefault("defaults", {"retry": FAST_RETRY, "timeout": 30})
    return build_graph(spec, REGISTRY)


async def run_graph(
    graph: Graph,
    *,
    input: Any = None,
    tally: Tally | None = None,
    recorder: MemoryRecorder | None = None,
    env: dict[str, str] | None = None,
    state: RunState | None = None,
    handle: RunHandle | None = None,
) -> tuple[RunUpdate, MemoryRecorder]:
    recorder = recorder or MemoryRecorder()
    engine = Engine(Resources(tally or Tally()), env)
    with anyio.fail_after(10):
        update = await engine.run(
            graph, RunInfo("run-1", graph.name, 1, input), recorder, state=state, handle=handle
        )
    return update, recorder


def seqs(recorder: MemoryRecorder) -> list[int]:
    return [e.seq for e in recorder.events]


def node_events(recorder: MemoryRecorder, type: EventType, node: str) -> list[Event]:
    return [e for e in recorder.events if e.type == type and e.data.get("node") == node]


def position(recorder: MemoryRecorder, type: EventType, node: str) -> int:
    (event,) = node_events(recorder, type, node)
    return event.seq


def assert_well_formed(recorder: MemoryRecorder) -> None:
    assert seqs(recorder) == list(range(1, len(recorder.events) + 1))
    assert recorder.events[0].type == EventType.WORKFLOW_STARTED
    assert recorder.events[-1].type == EventType.WORKFLOW_FINISHED
    assert len(recorder.of(EventType.WORKFLOW_FINISHED)) == 1


# --- linear, fan-out, join ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_linear_chain_runs_in_order_and_records_everything() -> None:
    graph = make_graph(
        {
            "a": {"agent": "echo", "value": "input.n + 1"},
            "b": {"agent": "echo", "value": "outputs.a * 10"},
            "c": {"agent": "echo", "value": "outputs.b + outputs.a"},
        },
        [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}],
    )
    update, rec = await run_graph(graph, input={"n": 1})

    assert update.status == RunStatus.SUCCEEDED
    assert update.output == 22
    assert_well_formed(rec)
    assert rec.types() == [
        "workflow.started",
        *["node.started", "node.completed"] * 3,
        "workflow.finished",
    ]
    assert [e.data["node"] for e in rec.of("node.completed")] == ["a", "b", "c"]
    assert rec.events[0].data == {"version": 1, "input": {"n": 1}}
    finished = rec.events[-1].data
    assert finished["status"] == "succeeded"
    assert finished["output"] == 22
    assert finished["error"] is None
    assert isinstance(finished["duration_ms"], int)
    completed = rec.of("node.completed")[1].data
    assert completed["output"] == 20
    assert completed["attempts"] == 1
    assert completed["iteration"] == 0
    assert "index" not in completed
    b = rec.execution("b")
    assert (b.status, b.output, b.attempts) == (NodeStatus.SUCCEEDED, 20, 1)
    assert b.started_at is not None
    assert b.finished_at is not None
    assert rec.run is not None
    assert rec.run.status == RunStatus.SUCCEEDED


@pytest.mark.anyio
async def test_fan_out_then_join_runs_the_join_once_after_every_branch() -> None:
    graph = make_graph(
        {
            "start": {"agent": "echo"},
            "long1": {"agent": "echo"},
            "long2": {"agent": "echo"},
            "long3": {"agent": "echo", "value": "'long'"},
            "short": {"agent": "echo", "value": "'short'"},
            "join": {"agent": "echo", "value": "[outputs.long3, outputs.short]"},
        },
        [
            {"from": "start", "to": ["long1", "short"]},
            {"from": "long1", "to": "long2"},
            {"from": "long2", "to": "long3"},
            {"from": ["long3", "short"], "to": "join"},
        ],
    )
    tally = Tally()
    update, rec = await run_graph(graph, tally=tally)

    assert update.status == RunStatus.SUCCEEDED
    assert update.output == ["long", "short"]
    assert tally.calls["join"] == 1
    assert len(node_events(rec, EventType.NODE_STARTED, "join")) == 1
    join_start = position(rec, EventType.NODE_STARTED, "join")
    assert join_start > position(rec, EventType.NODE_COMPLETED, "long3")
    assert join_start > position(rec, EventType.NODE_COMPLETED, "short")


@pytest.mark.anyio
async def test_conditional_branches_converge_with_the_untaken_branch_skipped() -> None:
    graph = make_graph(
        {
            "check": {"agent": "echo", "value": "input.x > 0"},
            "positive": {"agent": "echo", "value": "'pos'"},
            "negative": {"agent": "echo", "value": "'neg'"},
            "after_negative": {"agent": "echo"},
            "join": {"agent": "echo", "value": "outputs.positive"},
        },
        [
            {"from": "check", "to": "positive", "when": "outputs.check"},
            {"from": "check", "to": "negative", "when": "not outputs.check"},
            {"from": "negative", "to": "after_negative"},
            {"from": ["positive", "after_negative"], "to": "join"},
        ],
    )
    tally = Tally()
    update, rec = await run_graph(graph, input={"x": 5}, tally=tally)

    assert update.status == RunStatus.SUCCEEDED
    assert update.output == "pos"
    assert [e.data for e in rec.of("node.skipped")] == [{"node": "negative"}, {"node": "after_negative"}]
    assert rec.execution("negative").status == NodeStatus.SKIPPED
    assert rec.execution("after_negative").status == NodeStatus.SKIPPED
    assert tally.calls == Counter({"check": 1, "positive": 1, "join": 1})
    assert_well_formed(rec)


@pytest.mark.anyio
async def test_all_branches_false_skips_the_join_and_everything_after_it() -> None:
    graph = make_graph(
        {
            "a": {"agent": "echo"},
            "b": {"agent": "echo"},
            "c": {"agent": "echo"},
            "join": {"agent": "echo"},
            "after": {"agent": "echo"},
            "other": {"agent": "echo", "value": "'other'"},
        },
        [
            {"from": "a", "to": "b", "when": "false"},
            {"from": "a", "to": "c", "when": "input == 'never'"},
            {"from": ["b", "c"], "to": "join"},
            {"from": "join", "to": "after"},
            {"from": "a", "to": "other"},
        ],
    )
    tally = Tally()
    update, rec = await run_graph(graph, input="x", tally=tally)

    assert update.status == RunStatus.SUCCEEDED
    skipped = {e.data["node"] for e in rec.of("node.skipped")}
    assert skipped == {"b", "c", "join", "after"}
    assert tally.calls == Counter({"a": 1, "other": 1})
    # the default output: the sinks that ran
    assert update.output == "other"


@pytest.mark.anyio
async def test_a_fast_branch_goes_on_while_a_slow_sibling_still_runs() -> None:
    # `slow` only finishes once `after` (downstream of the fast branch) has run: with a global
    # superstep the run would hang here.
    graph = make_graph(
        {
            "start": {"agent": "echo"},
            "slow": {"agent": "gate", "wait": "'after-ran'"},
            "fast": {"agent": "echo"},
            "after": {"agent": "gate", "open": ["after-ran"]},
        },
        [{"from": "start", "to": ["slow", "fast"]}, {"from": "fast", "to": "after"}],
    )
    update, rec = await run_graph(graph)

    assert update.status == RunStatus.SUCCEEDED
    assert position(rec, EventType.NODE_COMPLETED, "after") < position(rec, EventType.NODE_COMPLETED, "slow")


@pytest.mark.anyio
async def test_concurrency_bounds_the_nodes_in_flight() -> None:
    nodes: dict[str, Any] = {"start": {"agent": "echo"}}
    nodes |= {f"w{i}": {"agent": "busy"} for i in range(6)}
    graph = make_graph(nodes, [{"from": "start", "to": [f"w{i}" for i in range(6)]}], concurrency=2)
    tally = Tally()
    update, _ = await run_graph(graph, tally=tally)

    assert update.status == RunStatus.SUCCEEDED
    assert tally.most_running == 2
    assert sum(tally.calls.values()) == 7


@pytest.mark.anyio
async def test_default_output_of_several_sinks_is_a_dict() -> None:
    graph = make_graph(
        {"a": {"agent": "echo"}, "b": {"agent": "echo", "value": "1"}, "c": {"agent": "echo", "value": "2"}},
        [{"from": "a", "to": ["b", "c"]}],
    )
    update, _ = await run_graph(graph)
    assert update.output == {"b": 1, "c": 2}


# --- loops -------------------------------------------------------------------------------------


LOOP_NODES: dict[str, Any] = {
    "plan": {"agent": "echo", "value": "'plan'"},
    "write": {"agent": "echo", "value": "'draft ' ~ iteration"},
    "critic": {"agent": "echo", "value": "{'approved': iteration >= 2}"},
    "publish": {"agent": "echo", "value": "outputs.write"},
}
LOOP_EDGES: list[dict[str, Any]] = [
    {"from": "plan", "to": "write"},
    {"from": "write", "to": "critic"},
    {"from": "critic", "to": "write", "when": "not outputs.critic.approved"},
    {"from": "critic", "to": "publish"},
]


@pytest.mark.anyio
async def test_loop_runs_until_the_critic_approves() -> None:
    graph = make_graph(LOOP_NODES, LOOP_EDGES, output="outputs.publish")
    tally = Tally()
    update, rec = await run_graph(graph, tally=tally)

    assert update.status == RunStatus.SUCCEEDED
    assert update.output == "draft 2"
    assert tally.calls == Counter({"plan": 1, "write": 3, "critic": 3, "publish": 1})
    assert [e.data["iteration"] for e in node_events(rec, EventType.NODE_STARTED, "write")] == [0, 1, 2]
    assert [e.data["iteration"] for e in node_events(rec, EventType.NODE_COMPLETED, "critic")] == [0, 1, 2]
    assert [e.data["output"] for e in node_events(rec, EventType.NODE_COMPLETED, "write")] == [
        "draft 0",
        "draft 1",
        "draft 2",
    ]
    # publish waits for the loop to end and sees the latest output
    assert position(rec, EventType.NODE_STARTED, "publish") > max(
        e.seq for e in node_events(rec, EventType.NODE_COMPLETED, "critic")
    )
    assert rec.execution("write", 2).output == "draft 2"
    assert rec.execution("publish").iteration == 0
    assert_well_formed(rec)


@pytest.mark.anyio
async def test_nested_fan_out_inside_a_loop_joins_once_per_pass() -> None:
    graph = make_graph(
        {
            "write": {"agent": "echo", "value": "iteration"},
            "left": {"agent": "echo", "value": "'L' ~ outputs.write"},
            "right": {"agent": "busy"},
            "join": {"agent": "echo", "value": "outputs.left ~ outputs.right"},
            "critic": {"agent": "echo", "value": "iteration >= 1"},
        },
        [
            {"from": "write", "to": ["left", "right"]},
            {"from": ["left", "right"], "to": "join"},
            {"from": "join", "to": "critic"},
            {"from": "critic", "to": "write", "when": "not outputs.critic"},
        ],
        output="outputs.join",
    )
    tally = Tally()
    update, rec = await run_graph(graph, tally=tally)

    assert update.status == RunStatus.SUCCEEDED
    assert update.output == "L1right"
    assert tally.calls == Counter({"write": 2, "left": 2, "right": 2, "join": 2, "critic": 2})
    assert [e.data["iteration"] for e in node_events(rec, EventType.NODE_STARTED, "join")] == [0, 1]


@pytest.mark.anyio
async def test_nested_loops_reset_their_own_bodies() -> None:
    # inner loop b -> c -> b runs twice per pass of the outer loop a -> ... -> d -> a
    graph = make_graph(
        {
            "a": {"agent": "echo"},
            "b": {"agent": "echo"},
            "c": {"agent": "echo", "value": "iteration % 2"},
            "d": {"agent": "echo", "value": "iteration"},
        },
        [
            {"from": "a", "to": "b"},
            {"from": "b", "to": "c"},
            {"from": "c", "to": "b", "when": "outputs.c < 1"},
            {"from": "c", "to": "d"},
            {"from": "d", "to": "a", "when": "outputs.d < 1"},
        ],
        output="outputs.d",
    )
    tally = Tally()
    update, rec = await run_graph(graph, tally=tally)
    assert update.status == RunStatus.SUCCEEDED
    assert update.output == 1
    assert tally.calls == Counter({"a": 2, "b": 4, "c": 4, "d": 2})
    assert [e.data["iteration"] for e in node_events(rec, EventType.NODE_COMPLETED, "c")] == [0, 1, 2, 3]
    assert tally.order == ["a", "b", "c", "b", "c", "d", "a", "b", "c", "b", "c", "d"]


@pytest.mark.anyio
async def test_max_steps_stops_a_loop_that_never_exits() -> None:
    graph = make_graph(
        {"a": {"agent": "echo"}, "b": {"agent": "echo"}},
        [{"from": "a", "to": "b"}, {"from": "b", "to": "a", "when": "true"}],
        max_steps=5,
    )
    tally = Tally()
    update, rec = await run_graph(graph, tally=tally)

    assert update.status == RunStatus.FAILED
    assert update.error == "run exceeded max_steps=5: is a loop missing its exit condition?"
    assert sum(tally.calls.values()) == 5
    assert_well_formed(rec)


# --- map ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_map_output_keeps_item_order_when_items_finish_in_reverse() -> None:
    # item i waits until item i+1 finished: they complete 3, 2, 1, 0
    graph = make_graph(
        {
            "letters": {"agent": "echo", "value": "['a', 'b', 'c', 'd']"},
            "each": {
                "agent": "gate",
                "map": "outputs.letters",
                "wait": "none if index == 3 else 'done' ~ (index + 1)",
                "value": "item ~ index",
            },
            "done": {"agent": "echo", "value": "outputs.each"},
        },
        [{"from": "letters", "to": "each"}, {"from": "each", "to": "done"}],
    )

    class OpenWhenDone(MemoryRecorder):
        def __init__(self, tally: Tally) -> None:
            super().__init__()
            self.tally = tally

        async def record(self, event: Event, change: NodeExecution | RunUpdate | None = None) -> None:
            await super().record(event, change)
            if event.type == EventType.NODE_COMPLETED and event.data.get("index") is not None:
                self.tally.gate(f"done{event.data['index']}").set()

    tally = Tally()
    update, rec = await run_graph(graph, tally=tally, recorder=OpenWhenDone(tally))

    assert update.status == RunStatus.SUCCEEDED
    assert update.output == ["a0", "b1", "c2", "d3"]
    items = [e for e in node_events(rec, EventType.NODE_COMPLETED, "each") if "index" in e.data]
    assert [e.data["index"] for e in items] == [3, 2, 1, 0]
    whole = [e for e in node_events(rec, EventType.NODE_COMPLETED, "each") if "index" not in e.data]
    assert len(whole) == 1
    assert whole[0].data["output"] == ["a0", "b1", "c2", "d3"]
    assert rec.execution("each", 0, 2).output == "c2"
    assert rec.execution("each").output == ["a0", "b1", "c2", "d3"]
    assert tally.calls["each"] == 4


@pytest.mark.anyio
async def test_map_of_an_empty_list_gives_an_empty_list() -> None:
    graph = make_graph({"each": {"agent": "echo", "map": "[]"}})
    tally = Tally()
    update, _ = await run_graph(graph, tally=tally)
    assert update.status == RunStatus.SUCCEEDED
    assert update.output == []
    assert tally.calls["each"] == 0


@pytest.mark.anyio
async def test_map_over_something_else_than_a_list_fails_the_node() -> None:
    graph = make_graph({"each": {"agent": "echo", "map": "'not a list'"}})
    update, rec = await run_graph(graph)
    assert update.status == RunStatus.FAILED
    assert update.error is not None
    assert update.error.startswith("node 'each' failed: ")
    assert "not a list" in update.error
    assert rec.execution("each").status == NodeStatus.FAILED


@pytest.mark.anyio
async def test_a_failing_map_item_fails_the_node_and_cancels_the_other_items() -> None:
    # item 0 fails at once (division by zero); items 1 and 2 block until cancelled
    graph = make_graph(
        {
            "each": {
                "agent": "gate",
                "map": "[0, 1, 2]",
                "wait": "none if index == 0 else 'never'",
                "value": "1 // index",
            }
        }
    )
    with anyio.fail_after(1):
        update, rec = await run_graph(graph)
    assert update.status == RunStatus.FAILED
    assert update.error is not None
    assert update.error.startswith("node 'each' failed: item 0: ")
    assert rec.execution("each", 0, 0).status == NodeStatus.FAILED
    assert rec.execution("each", 0, 1).status == NodeStatus.CANCELLED
    assert rec.execution("each", 0, 2).status == NodeStatus.CANCELLED
    assert rec.execution("each").status == NodeStatus.FAILED
    assert_well_formed(rec)


@pytest.mark.anyio
async def test_on_error_continue_in_a_map_keeps_the_other_items() -> None:
    graph = make_graph(
        {
            "each": {
                "agent": "echo",
                "map": "[1, 0, 2]",
                "value": "10 // item",
                "on_error": "continue",
            }
        }
    )
    update, rec = await run_graph(graph)
    assert update.status == RunStatus.SUCCEEDED
    assert update.output is not None
    assert update.output[0] == 10
    assert update.output[2] == 5
    assert "by zero" in update.output[1]["error"]
    assert rec.execution("each", 0, 1).status == NodeStatus.FAILED


# --- retries -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_retryable_failures_are_retried_until_success() -> None:
    graph = make_graph({"flaky": {"agent": "fail", "times": 2, "retryable": True}})
    update, rec = await run_graph(graph)

    assert update.status == RunStatus.SUCCEEDED
    assert update.output == "ok after 3"
    retrying = rec.of("node.retrying")
    assert [(e.data["attempt"], e.data["error"], e.data["delay"]) for e in retrying] == [
        (1, "boom", 0),
        (2, "boom", 0),
    ]
    assert [e.data["attempt"] for e in rec.of("node.started")] == [1, 2, 3]
    assert rec.of("node.completed")[0].data["attempts"] == 3
    assert rec.execution("flaky").attempts == 3


@pytest.mark.anyio
async def test_retry_delays_grow_exponentially_up_to_the_cap() -> None:
    retry = {"attempts": 4, "initial_delay": 0.001, "multiplier": 2, "max_delay": 0.003, "jitter": False}
    graph = make_graph({"flaky": {"agent": "fail", "times": 3, "retryable": True, "retry": retry}})
    update, rec = await run_graph(graph)
    assert update.status == RunStatus.SUCCEEDED
    assert [e.data["delay"] for e in rec.of("node.retrying")] == [0.001, 0.002, 0.003]


@pytest.mark.anyio
async def test_non_retryable_failure_fails_at_once() -> None:
    graph = make_graph({"bad": {"agent": "fail", "times": 1, "message": "bad request"}})
    tally = Tally()
    update, rec = await run_graph(graph, tally=tally)

    assert update.status == RunStatus.FAILED
    assert update.error == "node 'bad' failed: bad request"
    assert tally.calls["bad"] == 1
    assert rec.of("node.retrying") == []
    failed = rec.of("node.failed")[0].data
    assert failed == {"node": "bad", "error": "bad request", "iteration": 0}
    assert rec.execution("bad").attempts == 1
    assert rec.events[-1].data["error"] == "node 'bad' failed: bad request"


@pytest.mark.anyio
async def test_plain_exceptions_from_agents_are_not_retried() -> None:
    graph = make_graph({"bad": {"agent": "fail", "times": 1, "error": "value", "message": "nope"}})
    tally = Tally()
    update, _ = await run_graph(graph, tally=tally)
    assert update.status == RunStatus.FAILED
    assert update.error == "node 'bad' failed: ValueError: nope"
    assert tally.calls["bad"] == 1


@pytest.mark.anyio
async def test_timeouts_are_retried_then_fail_the_run_when_attempts_run_out() -> None:
    retry = {"attempts": 2, "initial_delay": 0, "multiplier": 1, "max_delay": 0, "jitter": False}
    graph = make_graph({"hang": {"agent": "fail", "error": "forever", "timeout": 0.05, "retry": retry}})
    tally = Tally()
    update, rec = await run_graph(graph, tally=tally)

    assert update.status == RunStatus.FAILED
    assert update.error == "node 'hang' failed: timed out after 0.05s"
    assert tally.calls["hang"] == 2
    assert [e.data["error"] for e in rec.of("node.retrying")] == ["timed out after 0.05s"]
    assert rec.execution("hang").status == NodeStatus.FAILED
    assert rec.execution("hang").attempts == 2


@pytest.mark.anyio
async def test_a_short_timeout_is_kept_while_a_longer_one_runs() -> None:
    # ``slow`` (30 s) starts first; ``quick`` (0.1 s) must still time out at its own deadline.
    graph = make_graph(
        {
            "slow": {"agent": "gate", "wait": "'never'", "timeout": 30, "retry": {"attempts": 1}},
            "quick": {"agent": "fail", "error": "forever", "timeout": 0.1, "retry": {"attempts": 1}},
        }
    )
    tally = Tally()
    began = anyio.current_time()
    update, rec = await run_graph(graph, tally=tally)

    assert update.status == RunStatus.FAILED
    assert update.error == "node 'quick' failed: timed out after 0.1s"
    assert 0.1 <= anyio.current_time() - began < 5
    assert tally.order == ["slow", "quick"]
    assert rec.execution("slow").status == NodeStatus.CANCELLED


@pytest.mark.anyio
async def test_retries_exhausted_fail_the_run() -> None:
    graph = make_graph({"flaky": {"agent": "fail", "retryable": True, "message": "503"}})
    tally = Tally()
    update, rec = await run_graph(graph, tally=tally)
    assert update.status == RunStatus.FAILED
    assert update.error == "node 'flaky' failed: 503"
    assert tally.calls["flaky"] == 3
    assert len(rec.of("node.retrying")) == 2


# --- failures and cancellation -----------------------------------------------------------------


@pytest.mark.anyio
async def test_a_failing_node_cancels_its_running_siblings() -> None:
    graph = make_graph(
        {
            "start": {"agent": "echo"},
            "blocker": {"agent": "gate", "open": ["blocking"], "wait": "'never'"},
            "bad": {"agent": "fail", "wait": "blocking", "message": "broken"},
            "after": {"agent": "echo"},
        },
        [{"from": "start", "to": ["blocker", "bad"]}, {"from": "blocker", "to": "after"}],
    )
    with anyio.fail_after(1):
        update, rec = await run_graph(graph)

    assert update.status == RunStatus.FAILED
    assert update.error == "node 'bad' failed: broken"
    blocker = rec.execution("blocker")
    assert blocker.status == NodeStatus.CANCELLED
    assert blocker.finished_at is not None
    assert node_events(rec, EventType.NODE_COMPLETED, "blocker") == []
    assert "after" not in {e.data.get("node") for e in rec.events}
    assert_well_formed(rec)


@pytest.mark.anyio
async def test_on_error_continue_turns_the_failure_into_an_output() -> None:
    graph = make_graph(
        {
            "risky": {"agent": "fail", "message": "404 not found", "on_error": "continue"},
            "next": {"agent": "echo", "value": "outputs.risky"},
        },
        [{"from": "risky", "to": "next"}],
    )
    update, rec = await run_graph(graph)

    assert update.status == RunStatus.SUCCEEDED
    assert update.output == {"error": "404 not found"}
    risky = rec.execution("risky")
    assert (risky.status, risky.output, risky.error) == (
        NodeStatus.FAILED,
        {"error": "404 not found"},
        "404 not found",
    )
    assert node_events(rec, EventType.NODE_FAILED, "risky")[0].data["error"] == "404 not found"
    assert node_events(rec, EventType.NODE_COMPLETED, "risky") == []


@pytest.mark.anyio
async def test_cancel_through_the_handle_ends_the_run_within_a_second() -> None:
    graph = make_graph(
        {"start": {"agent": "echo"}, "stuck": {"agent": "gate", "open": ["stuck"], "wait": "'never'"}},
        [{"from": "start", "to": "stuck"}],
    )
    tally = Tally()
    handle = RunHandle()
    result: list[RunUpdate] = []
    recorder = MemoryRecorder()

    async def run() -> None:
        update, _ = await run_graph(graph, tally=tally, handle=handle, recorder=recorder)
        result.append(update)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await tally.gate("stuck").wait()
        with anyio.fail_after(1):
            handle.cancel("cancelled by request")
            await recorder.wait_for(EventType.WORKFLOW_FINISHED)

    assert handle.cancelled
    assert result[0].status == RunStatus.CANCELLED
    assert result[0].error == "cancelled by request"
    assert recorder.execution("stuck").status == NodeStatus.CANCELLED
    assert recorder.execution("start").status == NodeStatus.SUCCEEDED
    assert recorder.events[-1].data["status"] == "cancelled"
    assert recorder.of("node.retrying") == []  # a cancellation is never retried
    assert_well_formed(recorder)


@pytest.mark.anyio
async def test_cancel_during_a_retry_backoff_is_not_swallowed() -> None:
    retry = {"attempts": 5, "initial_delay": 3600, "multiplier": 1, "max_delay": 3600, "jitter": False}
    graph = make_graph({"flaky": {"agent": "fail", "retryable": True, "retry": retry}})
    handle = RunHandle()
    recorder = MemoryRecorder()
    tally = Tally()
    result: list[RunUpdate] = []

    async def run() -> None:
        update, _ = await run_graph(graph, tally=tally, handle=handle, recorder=recorder)
        result.append(update)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        retrying = await recorder.wait_for(EventType.NODE_RETRYING)
        assert retrying.data["delay"] == 3600
        with anyio.fail_after(1):
            handle.cancel()
            await recorder.wait_for(EventType.WORKFLOW_FINISHED)

    assert result[0].status == RunStatus.CANCELLED
    assert tally.calls["flaky"] == 1
    assert recorder.execution("flaky").status == NodeStatus.CANCELLED


@pytest.mark.anyio
async def test_a_recorder_error_propagates_and_no_finish_is_recorded() -> None:
    class Broken(MemoryRecorder):
        async def record(self, event: Event, change: NodeExecution | RunUpdate | None = None) -> None:
            if event.type == EventType.NODE_COMPLETED:
                raise ConnectionError("database is gone")
            await super().record(event, change)

    graph = make_graph({"a": {"agent": "echo"}, "b": {"agent": "echo"}}, [{"from": "a", "to": "b"}])
    recorder = Broken()
    with pytest.raises(ConnectionError, match="database is gone"):
        await run_graph(graph, recorder=recorder)
    assert recorder.of("workflow.finished") == []
    assert recorder.types() == ["workflow.started", "node.started"]


class SlowRecorder(MemoryRecorder):
    """Suspends on every ``record`` (as a store does), and never answers for the events
    ``hangs`` accepts (a store gone without a word)."""

    def __init__(self, hangs: Callable[[Event], bool] = lambda _: False) -> None:
        super().__init__()
        self.hangs = hangs

    async def record(self, event: Event, change: NodeExecution | RunUpdate | None = None) -> None:
        await anyio.lowlevel.checkpoint()
        if self.hangs(event):
            await anyio.sleep_forever()
        await super().record(event, change)


@pytest.mark.anyio
@pytest.mark.parametrize("hang", ["node.started", "node.completed", "workflow.finished"])
async def test_a_store_that_stops_answering_stops_the_run_after_the_record_timeout(
    hang: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "RECORD_TIMEOUT", 0.3)
    recorder = SlowRecorder(lambda e: e.type == hang and e.data.get("node") in ("b", None))
    graph = make_graph({"a": {"agent": "echo"}, "b": {"agent": "echo"}}, [{"from": "a", "to": "b"}])
    tally = Tally()
    began = anyio.current_time()
    with pytest.raises(RecordTimeout, match=f"recording {hang} took over 0.3s"):
        await run_graph(graph, recorder=recorder, tally=tally)
    assert anyio.current_time() - began >= 0.3
    assert tally.calls["a"] == 1
    # An agent never runs on inputs that are not durable: ``b`` not before its start is.
    assert tally.calls["b"] == (0 if hang == "node.started" else 1)
    assert recorder.of("workflow.finished") == []


@pytest.mark.anyio
async def test_a_node_may_outlast_the_record_timeout_once_its_events_are_recorded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine_module, "RECORD_TIMEOUT", 0.2)
    recorder = SlowRecorder()
    graph = make_graph(
        {"a": {"agent": "gate", "wait": "'go'"}, "b": {"agent": "gate", "wait": "'go'"}},
        [{"from": "a", "to": "b"}],
    )
    tally = Tally()
    result: list[RunUpdate] = []

    async def run() -> None:
        update, _ = await run_graph(graph, recorder=recorder, tally=tally)
        result.append(update)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        with anyio.fail_after(5):
            await recorder.wait_for(lambda e: e.type == EventType.NODE_STARTED and e.data["node"] == "a")
        # Node ``a`` waits three record timeouts' time with its events recorded: it is not the
        # store's silence, and nothing may cut it short.
        await anyio.sleep(0.6)
        tally.gate("go").set()

    assert result[0].status == RunStatus.SUCCEEDED, result[0]
    assert tally.calls == Counter({"a": 1, "b": 1})


class QueuedRecorder(MemoryRecorder):
    """Commits in order through a queue, as the SQL store does (``record`` suspends), and can
    take an event's place at once (``record_later``). Commits wait while held (``hold_after``
    an event, until ``release``); with ``fail``, an event and every later one fail."""

    def __init__(self, hold_after: Callable[[Event], bool] = lambda _: False) -> None:
        super().__init__()
        self.queue: list[tuple[Event, NodeExecution | RunUpdate | None, anyio.Event]] = []
        self.hold_after = hold_after
        self.released = anyio.Event()
        self.released.set()
        self.held = anyio.Event()
        self.fail: Callable[[Event], bool] = lambda _: False
        self.broken = False

    async def record(self, event: Event, change: NodeExecution | RunUpdate | None = None) -> None:
        await self._committed(self.record_later(event, change))

    def record_later(self, event: Event, change: NodeExecution | RunUpdate | None = None) -> anyio.Event:
        done = anyio.Event()
        self.queue.append((event, change, done))
        return done

    async def finish(self, pending: Sequence[object]) -> None:
        for done in pending:
            await self._committed(cast(anyio.Event, done))

    async def _committed(self, done: anyio.Event) -> None:
        await anyio.lowlevel.checkpoint()
        while not done.is_set():
            await self.released.wait()
            if done.is_set():
                break
            first, change, first_done = self.queue.pop(0)
            if self.broken or self.fail(first):
                self.broken = True
                raise ConnectionError("database is gone")
            await MemoryRecorder.record(self, first, change)
            first_done.set()
            if self.hold_after(first):
                self.released = anyio.Event()
                self.held.set()

    def release(self) -> None:
        self.released.set()


async def wait_until(condition: Callable[[], bool]) -> None:
    while not condition():
        await anyio.lowlevel.checkpoint()


def durable(recorder: MemoryRecorder, type: EventType, node: str) -> bool:
    return any(e.type == type and e.data.get("node") == node for e in recorder.events)


@pytest.mark.anyio
async def test_fanned_out_agents_start_while_their_node_started_is_being_recorded() -> None:
    graph = make_graph(
        {
            "source": {"agent": "echo"},
            **{b: {"agent": "gate", "open": [f"ran-{b}"], "wait": "'go'"} for b in ("b1", "b2", "b3")},
            "join": {"agent": "echo"},
        },
        [{"from": "source", "to": b} for b in ("b1", "b2", "b3")]
        + [{"from": b, "to": "join"} for b in ("b1", "b2", "b3")],
    )
    # Commits stop once the source's completion is durable.
    recorder = QueuedRecorder(lambda e: e.type == EventType.NODE_COMPLETED and e.data["node"] == "source")
    tally = Tally()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            result: list[Any] = []

            async def run() -> None:
                result.append(await run_graph(graph, tally=tally, recorder=recorder))

            tg.start_soon(run)
            await recorder.held.wait()
            for b in ("b1", "b2", "b3"):
                await tally.gate(f"ran-{b}").wait()  # ran, though nothing more is committed
            assert [e.data.get("node") for e in recorder.of("node.started")] == ["source"]
            tally.gate("go").set()
            await wait_until(lambda: len(recorder.queue) >= 6)  # three starts, three completions
            assert tally.calls["join"] == 0  # its inputs are not durable: it waits
            recorder.release()
    assert result[0][0].status == RunStatus.SUCCEEDED
    assert seqs(recorder) == list(range(1, len(recorder.events) + 1))
    for b in ("b1", "b2", "b3"):
        kinds = [str(e.type) for e in recorder.events if e.data.get("node") == b]
        assert kinds == ["node.started", "node.completed"]


@pytest.mark.anyio
async def test_an_agent_never_runs_before_its_inputs_are_durable() -> None:
    seen: dict[str, set[str]] = {}
    recorder = QueuedRecorder()

    class CheckConfig(AgentConfig):
        pass

    @agent("check", config=CheckConfig)
    async def check(config: CheckConfig, ctx: NodeContext) -> Any:
        seen[ctx.node] = {n for n in "abcdef" if durable(recorder, EventType.NODE_COMPLETED, n)}
        await anyio.lowlevel.checkpoint()
        return ctx.node

    edges = [("a", "b"), ("a", "c"), ("a", "d"), ("b", "e"), ("c", "e"), ("d", "f"), ("e", "f")]
    spec = {
        "name": "inputs",
        "nodes": {n: {"agent": "check"} for n in "abcdef"},
        "edges": [{"from": s, "to": t} for s, t in edges],
    }
    graph = build_graph(spec, Registry([check.__braid_agent__]))  # type: ignore[attr-defined]
    with anyio.fail_after(5):
        update = await Engine().run(graph, RunInfo("run-1", "inputs", 1, None), recorder)
    assert update.status == RunStatus.SUCCEEDED
    for source, target in edges:
        assert source in seen[target], f"{target} ran before {source}'s completion was durable"
    assert seqs(recorder) == list(range(1, len(recorder.events) + 1))


@pytest.mark.anyio
async def test_a_node_started_recorded_later_that_fails_stops_the_run() -> None:
    graph = make_graph(
        {
            "source": {"agent": "echo"},
            "b1": {"agent": "gate", "open": ["b1-ran"], "wait": "'never'"},
            "b2": {"agent": "gate", "wait": "'never'"},
        },
        [{"from": "source", "to": "b1"}, {"from": "source", "to": "b2"}],
    )
    recorder = QueuedRecorder()
    recorder.fail = lambda e: e.type == EventType.NODE_STARTED and e.data["node"] == "b1"
    tally = Tally()
    with pytest.raises(ConnectionError, match="database is gone"), anyio.fail_after(5):
        await run_graph(graph, tally=tally, recorder=recorder)
    # b1's agent ran (its start was being recorded), then was stopped with the run; nothing
    # after the failed event was recorded
    assert tally.calls["b1"] == 1
    assert recorder.types() == ["workflow.started", "node.started", "node.completed"]


@pytest.mark.anyio
async def test_cancelling_a_fan_out_whose_starts_are_still_committing_leaves_no_gap() -> None:
    branches = [f"b{i}" for i in range(5)]
    graph = make_graph(
        {
            "source": {"agent": "echo"},
            **{b: {"agent": "gate", "open": [f"ran-{b}"], "wait": "'never'"} for b in branches},
            "join": {"agent": "echo"},
        },
        [{"from": "source", "to": b} for b in branches] + [{"from": b, "to": "join"} for b in branches],
    )
    # Commits stop once the source's completion is durable: the branches' starts wait in the
    # queue (their agents running) when the run is cancelled.
    recorder = QueuedRecorder(lambda e: e.type == EventType.NODE_COMPLETED and e.data["node"] == "source")
    tally = Tally()
    handle = RunHandle()
    result: list[RunUpdate] = []

    async def run() -> None:
        update, _ = await run_graph(graph, tally=tally, handle=handle, recorder=recorder)
        result.append(update)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            for b in branches:
                await tally.gate(f"ran-{b}").wait()
            handle.cancel("cancelled by request")
            await wait_until(lambda: len(recorder.queue) >= 2 * len(branches))  # starts, then ends
            recorder.release()

    assert result[0].status == RunStatus.CANCELLED
    assert seqs(recorder) == list(range(1, len(recorder.events) + 1))
    assert recorder.events[-1].type == EventType.WORKFLOW_FINISHED
    for b in branches:
        kinds = [str(e.type) for e in recorder.events if e.data.get("node") == b]
        assert kinds == ["node.started", "node.failed"], (b, kinds)
        assert recorder.execution(b).status == NodeStatus.CANCELLED
    assert tally.calls["join"] == 0


@pytest.mark.anyio
async def test_a_handle_cancelled_before_the_run_cancels_it_at_once() -> None:
    graph = make_graph({"a": {"agent": "echo"}})
    handle = RunHandle()
    handle.cancel()
    tally = Tally()
    update, rec = await run_graph(graph, tally=tally, handle=handle)
    assert update.status == RunStatus.CANCELLED
    assert tally.calls["a"] == 0
    assert rec.types() == ["workflow.started", "workflow.finished"]


@pytest.mark.anyio
async def test_cancellation_from_outside_propagates_and_leaves_the_run_running() -> None:
    graph = make_graph({"stuck": {"agent": "gate", "open": ["stuck"], "wait": "'never'"}})
    tally = Tally()
    recorder = MemoryRecorder()
    engine = Engine(Resources(tally))
    reached_the_end = False

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                nonlocal reached_the_end
                await engine.run(graph, RunInfo("run-1", "test", 1, None), recorder)
                reached_the_end = True

            tg.start_soon(run)
            await tally.gate("stuck").wait()
            tg.cancel_scope.cancel()

    assert not reached_the_end
    assert recorder.of("workflow.finished") == []
    assert recorder.run is not None
    assert recorder.run.status == RunStatus.RUNNING
    assert recorder.execution("stuck").status == NodeStatus.RUNNING


# --- expressions, output, env, deltas ----------------------------------------------------------


@pytest.mark.anyio
async def test_a_template_error_in_the_first_node_ends_the_run_with_workflow_finished() -> None:
    graph = make_graph({"first": {"agent": "echo", "value": "input.missing.deeper"}})
    update, rec = await run_graph(graph, input={})
    assert update.status == RunStatus.FAILED
    assert update.error is not None
    assert update.error.startswith("node 'first' failed: ")
    assert "missing" in update.error
    assert rec.types() == ["workflow.started", "node.started", "node.failed", "workflow.finished"]


@pytest.mark.anyio
async def test_a_when_error_is_a_failure_of_the_source_node() -> None:
    graph = make_graph(
        {"a": {"agent": "echo", "value": "{}"}, "b": {"agent": "echo"}},
        [{"from": "a", "to": "b", "when": "outputs.a.nope.deeper"}],
    )
    tally = Tally()
    update, rec = await run_graph(graph, tally=tally)
    assert update.status == RunStatus.FAILED
    assert update.error is not None
    assert update.error.startswith("node 'a' failed: edge a → b:")
    assert rec.execution("a").status == NodeStatus.FAILED
    assert tally.calls["b"] == 0


@pytest.mark.anyio
async def test_the_output_expression_gives_the_run_output() -> None:
    graph = make_graph(
        {"a": {"agent": "echo", "value": "'hi'"}, "b": {"agent": "echo", "value": "2"}},
        [{"from": "a", "to": "b"}],
        output="{'text': outputs.a ~ '!', 'n': outputs.b, 'run': run.id}",
    )
    update, rec = await run_graph(graph)
    assert update.output == {"text": "hi!", "n": 2, "run": "run-1"}
    assert rec.events[-1].data["output"] == update.output


@pytest.mark.anyio
async def test_a_failing_output_expression_fails_the_run() -> None:
    graph = make_graph({"a": {"agent": "echo"}}, output="outputs.nothere.x")
    update, rec = await run_graph(graph)
    assert update.status == RunStatus.FAILED
    assert update.error is not None
    assert "nothere" in update.error
    assert rec.events[-1].type == EventType.WORKFLOW_FINISHED


@pytest.mark.anyio
async def test_env_holds_only_the_variables_the_engine_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRAID_TEST_SECRET", "from-os")
    graph = make_graph({"a": {"agent": "echo", "value": "env.BRAID_TEST_SECRET"}})
    update, _ = await run_graph(graph, env={"BRAID_TEST_SECRET": "given"})
    assert update.output == "given"

    update, _ = await run_graph(graph)
    assert update.status == RunStatus.FAILED
    assert update.error is not None
    assert "BRAID_TEST_SECRET" in update.error


@pytest.mark.anyio
async def test_deltas_and_usage_are_recorded() -> None:
    graph = make_graph(
        {"a": {"agent": "echo", "deltas": ["Hel", "lo"], "tokens": 5}, "b": {"agent": "echo", "tokens": 7}},
        [{"from": "a", "to": "b"}],
    )
    update, rec = await run_graph(graph)
    deltas = rec.of("node.delta")
    assert [e.data for e in deltas] == [{"node": "a", "delta": "Hel"}, {"node": "a", "delta": "lo"}]
    assert rec.types()[1:5] == ["node.started", "node.delta", "node.delta", "node.completed"]
    assert rec.of("node.completed")[0].data["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    assert rec.execution("a").usage == {"prompt_tokens": 5, "total_tokens": 5}
    assert update.usage == {"prompt_tokens": 12, "total_tokens": 12}
    assert rec.events[-1].data["usage"] == {"prompt_tokens": 12, "total_tokens": 12}


@pytest.mark.anyio
async def test_agents_get_a_copy_of_the_outputs() -> None:
    class MutateConfig(AgentConfig):
        pass

    @agent("mutate", config=MutateConfig)
    async def mutate(config: MutateConfig, ctx: NodeContext) -> Any:
        ctx.variables["outputs"]["a"]["x"] = "changed"
        return None

    registry = Registry([echo.__braid_agent__, mutate.__braid_agent__])  # type: ignore[attr-defined]
    spec: dict[str, Any] = {
        "name": "test",
        "nodes": {"a": {"agent": "echo", "value": "{'x': 1}"}, "m": {"agent": "mutate"}},
        "edges": [{"from": "a", "to": "m"}],
        "output": "outputs.a",
    }
    update, _ = await run_graph(build_graph(spec, registry))
    assert update.output == {"x": 1}


@pytest.mark.anyio
async def test_details_an_agent_notes_go_out_with_the_node_events() -> None:
    class NoteConfig(AgentConfig):
        fail_first: bool = False

    @agent("noting", config=NoteConfig)
    async def noting(config: NoteConfig, ctx: NodeContext) -> Any:
        ctx.note(prompt="x" if ctx.attempt == 1 else f"x{ctx.attempt}")
        if config.fail_first and ctx.attempt == 1:
            raise NodeError("try again", retryable=True)
        return ctx.node

    registry = Registry([echo.__braid_agent__, noting.__braid_agent__])  # type: ignore[attr-defined]
    spec: dict[str, Any] = {
        "name": "test",
        "defaults": {"retry": FAST_RETRY, "timeout": 30},
        "nodes": {
            "a": {"agent": "noting"},
            "b": {"agent": "noting", "fail_first": True},
            "c": {"agent": "echo"},
        },
        "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}],
    }
    update, rec = await run_graph(build_graph(spec, registry))
    assert update.status == RunStatus.SUCCEEDED
    assert node_events(rec, EventType.NODE_COMPLETED, "a")[0].data["details"] == {"prompt": "x"}
    (retrying,) = node_events(rec, EventType.NODE_RETRYING, "b")
    assert retrying.data["details"] == {"prompt": "x"}
    assert node_events(rec, EventType.NODE_COMPLETED, "b")[0].data["details"] == {"prompt": "x2"}
    assert "details" not in node_events(rec, EventType.NODE_COMPLETED, "c")[0].data


# --- resume ------------------------------------------------------------------------------------


class CrashingRecorder(MemoryRecorder):
    """Persists the first ``limit`` events, then "dies": it cancels the worker's scope and drops
    every later event, as a worker whose process was killed would."""

    def __init__(self, limit: int, scope: anyio.CancelScope) -> None:
        super().__init__()
        self.limit = limit
        self.scope = scope

    async def record(self, event: Event, change: NodeExecution | RunUpdate | None = None) -> None:
        if len(self.events) >= self.limit:
            self.scope.cancel()
            return
        await super().record(event, change)


async def crash_then_resume(
    graph: Graph, limit: int, tally: Tally
) -> tuple[CrashingRecorder, MemoryRecorder]:
    engine = Engine(Resources(tally))
    info = RunInfo("run-1", graph.name, 1, None)
    worker = anyio.CancelScope()
    first = CrashingRecorder(limit, worker)
    with anyio.fail_after(5):
        with worker:
            await engine.run(graph, info, first)
        assert first.of("workflow.finished") == []
        second = MemoryRecorder()
        await engine.run(graph, info, second, state=first.state())
    return first, second


@pytest.mark.anyio
async def test_resume_after_a_crash_does_not_run_completed_nodes_again() -> None:
    graph = make_graph(
        {n: {"agent": "echo", "value": f"'{n}!'"} for n in "abcd"},
        [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}, {"from": "c", "to": "d"}],
        output="[outputs.a, outputs.b, outputs.c, outputs.d]",
    )
    tally = Tally()
    # started, a started, a completed, b started, b completed | crash
    first, second = await crash_then_resume(graph, 5, tally)

    assert first.types()[-1] == "node.completed"
    # a and b completed before the crash: never again; c was in flight when it hit
    assert tally.calls["a"] == 1
    assert tally.calls["b"] == 1
    assert tally.calls["c"] >= 1
    assert tally.calls["d"] == 1
    assert second.events[0].seq == 6
    assert seqs(first) + seqs(second) == list(range(1, len(first.events) + len(second.events) + 1))
    assert "workflow.started" not in second.types()
    assert {e.data["node"] for e in second.of("node.started")} == {"c", "d"}
    assert second.run is not None
    assert second.run.status == RunStatus.SUCCEEDED
    assert second.run.output == ["a!", "b!", "c!", "d!"]


@pytest.mark.anyio
async def test_resume_reruns_the_node_that_was_in_flight() -> None:
    graph = make_graph(
        {"a": {"agent": "echo"}, "b": {"agent": "echo"}},
        [{"from": "a", "to": "b"}],
    )
    tally = Tally()
    # started, a started, a completed, b started | crash (b's completion is lost)
    first, second = await crash_then_resume(graph, 4, tally)
    assert first.types()[-1] == "node.started"
    assert tally.calls["a"] == 1
    assert tally.calls["b"] >= 1
    assert second.of("node.started")[0].data["node"] == "b"
    assert second.run is not None
    assert second.run.status == RunStatus.SUCCEEDED
    assert seqs(first) + seqs(second) == list(range(1, len(first.events) + len(second.events) + 1))


@pytest.mark.anyio
async def test_resume_inside_a_loop_and_a_map_replays_what_was_done() -> None:
    graph = make_graph(
        {
            "write": {"agent": "echo", "map": "[iteration, iteration + 1]", "value": "item * 10"},
            "critic": {"agent": "echo", "value": "iteration >= 1"},
        },
        [{"from": "write", "to": "critic"}, {"from": "critic", "to": "write", "when": "not outputs.critic"}],
        output="outputs.write",
    )
    reference_tally = Tally()
    _, reference = await run_graph(graph, tally=reference_tally)
    total = len(reference.events)
    for limit in range(2, total):
        tally = Tally()
        first, second = await crash_then_resume(graph, limit, tally)
        assert second.run is not None
        assert second.run.status == RunStatus.SUCCEEDED, limit
        assert second.run.output == [10, 20], limit
        completed = {ex.key for ex in first.executions.values() if ex.status == NodeStatus.SUCCEEDED}
        restarted = {
            (e.data["node"], e.data["iteration"], e.data.get("index")) for e in second.of("node.started")
        }
        assert not completed & restarted, limit
        assert {ex.key for ex in second.executions.values()} | completed == set(reference.executions), limit
        assert seqs(first) + seqs(second) == list(range(1, len(first.events) + len(second.events) + 1))
        assert second.events[-1].type == EventType.WORKFLOW_FINISHED


# --- odd graphs ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_graph_without_an_entry_node_still_finishes() -> None:
    graph = make_graph({"a": {"agent": "echo"}})
    broken = Graph(name=graph.name, nodes=graph.nodes, edges=[], entry=[])
    update, rec = await run_graph(broken)
    assert update.status == RunStatus.FAILED
    assert update.error is not None
    assert "entry" in update.error
    assert rec.types() == ["workflow.started", "workflow.finished"]


@pytest.mark.anyio
async def test_retryable_error_class_is_retryable() -> None:
    graph = make_graph({"flaky": {"agent": "fail", "times": 1, "retryable": True}})
    update, _ = await run_graph(graph)
    assert update.status == RunStatus.SUCCEEDED
    assert RetryableError("x").retryable


@pytest.mark.anyio
async def test_an_output_that_is_not_json_data_fails_the_node_not_the_recording() -> None:
    graph = make_graph({"a": {"agent": "echo", "value": "input.items"}})
    update, recorder = await run_graph(graph, input={"items": [1]})
    assert update.status == RunStatus.FAILED
    assert "not JSON data" in (update.error or "")
    assert "input['items']" in (update.error or "")
    assert recorder.types()[-2:] == ["node.failed", "workflow.finished"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1e308 * 10", "output is inf, not a JSON number"),
        ("{'x': [1e308 * -10]}", "output.x[0] is -inf, not a JSON number"),
        ("'ok \\ud800'", "output is a string that is not valid Unicode"),
    ],
)
async def test_an_output_no_client_could_parse_fails_the_node(value: str, message: str) -> None:
    """JSON has no Infinity or NaN and no lone surrogates: such an output would reach SSE clients
    as text their JSON.parse rejects, so the node fails with the path of the value."""
    graph = make_graph({"a": {"agent": "echo", "value": value}})
    update, recorder = await run_graph(graph)
    assert update.status == RunStatus.FAILED
    assert message in (update.error or "")
    assert recorder.types()[-2:] == ["node.failed", "workflow.finished"]


@pytest.mark.anyio
async def test_a_missing_key_error_names_the_keys_that_are_there() -> None:
    graph = make_graph(
        {
            "a": {"agent": "echo", "value": "{'summary': 'x', 'score': 3}"},
            "b": {"agent": "echo", "value": "outputs.a.sumary"},
        },
        [{"from": "a", "to": "b"}],
    )
    update, _ = await run_graph(graph, input={})
    assert update.status == RunStatus.FAILED
    assert "no key 'sumary' (keys: summary, score)" in (update.error or "")
    assert "_CopyOnRead" not in (update.error or "")
