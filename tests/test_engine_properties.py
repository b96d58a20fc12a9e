"""Properties of the scheduler on random DAGs with random conditions, checked against an
independent reference: which nodes run follows only from the graph, never from timing."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.registry import AgentConfig, Registry, agent
from server.engine import Engine, MemoryRecorder, NodeContext, Resources, RunInfo
from server.graph.parse import build_graph
from server.status import EventType, NodeStatus, RunStatus
from tests.test_engine import QueuedRecorder


class Calls(Counter[str]):
    recorder: MemoryRecorder | None = None
    ended: dict[str, set[str]]
    """Per node, the nodes whose end (completion or skip) was recorded when its agent began."""


class ValueConfig(AgentConfig):
    value: int
    yields: int = 0


@agent("value", config=ValueConfig)
async def value_agent(config: ValueConfig, ctx: NodeContext) -> int:
    """Returns ``value`` after yielding to the loop ``yields`` times (to vary interleavings)."""
    calls = ctx.resources.get(Calls)
    calls[ctx.node] += 1
    if calls.recorder is not None:
        done = (EventType.NODE_COMPLETED, EventType.NODE_SKIPPED)
        calls.ended[ctx.node] = {e.data["node"] for e in calls.recorder.events if e.type in done}
    for _ in range(config.yields):
        await anyio.lowlevel.checkpoint()
    return config.value


REGISTRY = Registry([value_agent.__braid_agent__])  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Case:
    values: list[int]
    yields: list[int]
    edges: list[tuple[int, int, str | None]]
    """(source, target, when) with source < target: a DAG. ``when`` is None, "true", "false" or
    ``> t`` (the source's output compared with t)."""
    concurrency: int

    def name(self, i: int) -> str:
        return f"n{i}"

    def when_source(self, source: int, when: str | None) -> str | None:
        if when is None or when in ("true", "false"):
            return when
        return f"outputs.{self.name(source)} {when}"

    def spec(self) -> dict[str, Any]:
        return {
            "name": "prop",
            "concurrency": self.concurrency,
            "nodes": {
                self.name(i): {"agent": "value", "value": v, "yields": y}
                for i, (v, y) in enumerate(zip(self.values, self.yields, strict=True))
            },
            "edges": [
                {"from": self.name(s), "to": self.name(t), **({"when": w} if w is not None else {})}
                for s, t, w in ((s, t, self.when_source(s, w)) for s, t, w in self.edges)
            ],
        }

    def expected_to_run(self) -> set[str]:
        """The reference: entry nodes run; any other node runs iff at least one incoming edge is
        taken from a node that ran."""
        ran: list[bool] = []
        for j in range(len(self.values)):
            incoming = [(s, w) for s, t, w in self.edges if t == j]
            if not incoming:
                ran.append(True)
                continue
            ran.append(any(ran[s] and self.taken(s, w) for s, w in incoming))
        return {self.name(i) for i, r in enumerate(ran) if r}

    def taken(self, source: int, when: str | None) -> bool:
        if when is None or when == "true":
            return True
        if when == "false":
            return False
        return self.values[source] > int(when.removeprefix("> "))


@st.composite
def cases(draw: st.DrawFn) -> Case:
    n = draw(st.integers(min_value=3, max_value=12))
    values = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
    yields = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    when = st.one_of(st.none(), st.sampled_from(["true", "false"]), st.integers(0, 9).map(lambda t: f"> {t}"))
    edges: list[tuple[int, int, str | None]] = []
    for t in range(1, n):
        for s in range(t):
            if draw(st.integers(0, 99)) < 35:
                edges.append((s, t, draw(when)))
    concurrency = draw(st.integers(1, 4))
    return Case(values, yields, edges, concurrency)


@pytest.mark.parametrize("queued", [False, True], ids=["in-memory", "queued-commits"])
@settings(max_examples=100, deadline=None)
@given(case=cases())
def test_random_dags_run_exactly_the_nodes_the_reference_says(queued: bool, case: Case) -> None:
    """With an in-memory recorder (each event recorded at once), and with one that commits
    through a queue as the SQL store does (nodes start while their predecessors' completions
    are committing, and record their starts in the background)."""
    graph = build_graph(case.spec(), REGISTRY)
    recorder = QueuedRecorder() if queued else MemoryRecorder()
    calls = Calls()
    calls.recorder, calls.ended = recorder, {}

    async def main() -> None:
        with anyio.fail_after(10):  # the run terminates
            update = await Engine(Resources(calls)).run(graph, RunInfo("r", "prop", 1, None), recorder)
        assert update.status == RunStatus.SUCCEEDED

    anyio.run(main)
    events = recorder.events
    names = [case.name(i) for i in range(len(case.values))]
    expected = case.expected_to_run()

    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].type == EventType.WORKFLOW_STARTED
    assert events[-1].type == EventType.WORKFLOW_FINISHED
    assert sum(e.type == EventType.WORKFLOW_FINISHED for e in events) == 1

    ran = {n for n in names if calls[n]}
    assert ran == expected
    assert all(calls[n] <= 1 for n in names)  # join-once

    for name in names:
        ends = [
            e
            for e in events
            if e.data.get("node") == name and e.type in (EventType.NODE_COMPLETED, EventType.NODE_SKIPPED)
        ]
        assert len(ends) == 1, name  # exactly one terminal event
        record = recorder.executions[(name, 0, None)]
        if name in expected:
            assert record.status == NodeStatus.SUCCEEDED
            assert ends[0].type == EventType.NODE_COMPLETED
            started = [e.seq for e in events if e.type == EventType.NODE_STARTED and e.data["node"] == name]
            assert len(started) == 1
            assert started[0] < ends[0].seq
        else:
            assert record.status == NodeStatus.SKIPPED
            assert ends[0].type == EventType.NODE_SKIPPED
    assert set(recorder.executions) == {(n, 0, None) for n in names}

    # a node starts (or is skipped) only after every one of its inputs has ended
    end_seq = {
        e.data["node"]: e.seq for e in events if e.type in (EventType.NODE_COMPLETED, EventType.NODE_SKIPPED)
    }
    first_seq = {
        e.data["node"]: e.seq
        for e in reversed(events)
        if e.type in (EventType.NODE_STARTED, EventType.NODE_SKIPPED)
    }
    for s, t, _ in case.edges:
        assert end_seq[case.name(s)] < first_seq[case.name(t)], (s, t)
        # an agent never runs before the ends of its inputs are durable
        if case.name(t) in calls.ended:
            assert case.name(s) in calls.ended[case.name(t)], (s, t)
