"""Engine overhead: µs per no-op node for Braid's engine and LangGraph, same shapes, same process.

    uv run --group bench python -m bench.engine_overhead [--reps 7] [--profile]

Shapes: a chain of 100 nodes, a 100-way and a 1,000-way fan-out/join (source, branches, join).
Braid runs with a ``MemoryRecorder`` and with every event durably recorded in SQLite (``SqlStore``
on a temporary file); LangGraph without a checkpointer and with ``InMemorySaver``. Graph parsing
and compiling are outside the timing; each figure is the median of ``--reps`` runs after one
warm-up run, the four engines taking turns run by run (see ``take_turns``). ``--profile`` prints
cProfile's top functions of Braid in memory on the 1,000 fan-out.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import operator
import pstats
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypedDict

import anyio

from bench.common import chain_spec, fanout_spec, median, registry, table, take_turns, token
from server.engine.engine import Engine
from server.engine.memory import MemoryRecorder
from server.engine.records import RunInfo
from server.graph.model import Graph
from server.graph.parse import parse_graph
from server.status import RunStatus

SHAPES: dict[str, tuple[str, int]] = {
    "chain 100": ("chain", 100),
    "fan-out 100": ("fanout", 100),
    "fan-out 1000": ("fanout", 1000),
}
TARGET_MEMORY = 0.25
"""Braid in memory should cost at most a quarter of LangGraph without persistence."""


def braid_spec(shape: str, size: int) -> dict[str, Any]:
    name = f"bench-{shape}-{size}"
    return chain_spec(name, size) if shape == "chain" else fanout_spec(name, size)


def node_count(shape: str, size: int) -> int:
    return size if shape == "chain" else size + 2


# --- Braid ---------------------------------------------------------------------------------------


ENGINE = Engine()
"""One engine for every run, as a worker has (it keeps what the runs of a graph share)."""


async def braid_memory(graph: Graph) -> None:
    update = await ENGINE.run(graph, RunInfo(token(), graph.name, 1, {}), MemoryRecorder())
    assert update.status == RunStatus.SUCCEEDED, update


class SqliteRuns:
    """A ``SqlStore`` on a temporary SQLite file, with the graph rows the runs reference."""

    def __init__(self, folder: Path) -> None:
        from server.store.sql import SqlStore

        self.store = SqlStore(f"sqlite+aiosqlite:///{folder / 'bench.db'}")
        self.created: set[str] = set()

    async def run(self, graph: Graph) -> None:
        if graph.name not in self.created:
            await self.store.create_graph(graph.name, graph.spec, None, len(graph.nodes))
            self.created.add(graph.name)
        record, _ = await self.store.create_run(graph.name, 1, {})
        update = await ENGINE.run(graph, RunInfo(record.id, graph.name, 1, {}), self.store)
        assert update.status == RunStatus.SUCCEEDED, update


# --- LangGraph -----------------------------------------------------------------------------------


class State(TypedDict):
    seen: Annotated[list[str], operator.add]


def langgraph_app(shape: str, size: int, checkpointer: Any = None) -> Any:
    from langgraph.graph import END, START, StateGraph

    def noop(name: str) -> Callable[[State], Awaitable[dict[str, Any]]]:
        async def run(state: State) -> dict[str, Any]:
            return {"seen": [name]}

        return run

    builder = StateGraph(State)
    if shape == "chain":
        names = [f"n{i}" for i in range(size)]
        for name in names:
            builder.add_node(name, noop(name))
        builder.add_edge(START, names[0])
        for a, b in itertools.pairwise(names):
            builder.add_edge(a, b)
        builder.add_edge(names[-1], END)
    else:
        branches = [f"b{i}" for i in range(size)]
        for name in ["source", *branches, "join"]:
            builder.add_node(name, noop(name))
        builder.add_edge(START, "source")
        for b in branches:
            builder.add_edge("source", b)
        builder.add_edge(branches, "join")  # waits for every branch
        builder.add_edge("join", END)
    return builder.compile(checkpointer=checkpointer)


async def langgraph_run(app: Any, expected: int) -> None:
    config = {"configurable": {"thread_id": token()}, "recursion_limit": expected + 10}
    result = await app.ainvoke({"seen": []}, config=config)
    assert len(result["seen"]) == expected, len(result["seen"])


# --- measuring -----------------------------------------------------------------------------------


async def measure(reps: int) -> dict[str, Any]:
    from langgraph.checkpoint.memory import InMemorySaver

    reg = registry()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="braid-bench-") as folder:
        sqlite = SqliteRuns(Path(folder))
        await sqlite.store.start()
        try:
            for label, (shape, size) in SHAPES.items():
                graph = parse_graph(braid_spec(shape, size), reg)
                nodes = node_count(shape, size)
                plain = langgraph_app(shape, size)
                saved = langgraph_app(shape, size, InMemorySaver())
                n_reps = reps if size < 1000 else max(1, reps - 2)
                times = await take_turns(
                    {
                        "braid_memory": lambda g=graph: braid_memory(g),
                        "braid_sqlite": lambda g=graph: sqlite.run(g),
                        "langgraph": lambda a=plain, n=nodes: langgraph_run(a, n),
                        "langgraph_saver": lambda a=saved, n=nodes: langgraph_run(a, n),
                    },
                    n_reps,
                )
                seconds = {name: median(values) for name, values in times.items()}
                results[label] = {
                    "nodes": nodes,
                    "reps": n_reps,
                    "us_per_node": {k: v / nodes * 1e6 for k, v in seconds.items()},
                }
        finally:
            await sqlite.store.close()
    return results


def ratios(row: dict[str, Any]) -> tuple[float, float]:
    us = row["us_per_node"]
    return us["braid_memory"] / us["langgraph"], us["braid_sqlite"] / us["langgraph_saver"]


def report(results: dict[str, Any]) -> str:
    rows = []
    for label, row in results.items():
        us = row["us_per_node"]
        memory_ratio, durable_ratio = ratios(row)
        rows.append(
            [
                label,
                us["braid_memory"],
                us["braid_sqlite"],
                us["langgraph"],
                us["langgraph_saver"],
                f"{memory_ratio:.2f}",
                f"{durable_ratio:.2f}",
            ]
        )
    headers = [
        "shape",
        "braid mem",
        "braid sqlite",
        "langgraph",
        "lg+saver",
        "mem/lg (≤0.25)",
        "sqlite/saver (≤1)",
    ]
    return table("Engine overhead, µs per node (median)", headers, rows)


def profile(top: int = 25) -> str:
    """cProfile of Braid in memory on the 1,000-way fan-out: the top functions by own time."""
    graph = parse_graph(braid_spec("fanout", 1000), registry())
    anyio.run(braid_memory, graph)  # warm-up
    profiler = cProfile.Profile()
    profiler.enable()
    anyio.run(braid_memory, graph)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_overhead", description=__doc__)
    parser.add_argument("--reps", type=int, default=7, help="timed runs per figure (median)")
    parser.add_argument("--profile", action="store_true", help="cProfile Braid on the 1,000 fan-out")
    args = parser.parse_args(argv)
    results = anyio.run(measure, args.reps)
    print(report(results), flush=True)
    if args.profile:
        print(profile(), flush=True)
    return results


if __name__ == "__main__":
    main()
