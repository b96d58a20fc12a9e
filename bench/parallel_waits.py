"""Parallel waits: 1,000 branches each waiting 0.5 s, all at once. Wall time of the whole run.

    uv run --group bench python -m bench.parallel_waits [--width 1000] [--seconds 0.5] [--reps 3]

Braid: ``source -> 1,000 wait nodes -> join`` with ``concurrency: 1000``, in memory and durably
recorded in SQLite; LangGraph: the same shape with ``asyncio.sleep`` nodes. Target: ≤ 0.65 s.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import Any

import anyio

from bench.common import fanout_spec, median, registry, table, take_turns
from bench.engine_overhead import SqliteRuns, State, braid_memory, langgraph_run
from server.graph.parse import parse_graph

TARGET_SECONDS = 0.65


def langgraph_waits(width: int, seconds: float) -> Any:
    from langgraph.graph import END, START, StateGraph

    async def noop(state: State) -> dict[str, Any]:
        return {"seen": ["x"]}

    async def wait(state: State) -> dict[str, Any]:
        await asyncio.sleep(seconds)
        return {"seen": ["w"]}

    builder = StateGraph(State)
    branches = [f"b{i}" for i in range(width)]
    builder.add_node("source", noop)
    builder.add_node("join", noop)
    for b in branches:
        builder.add_node(b, wait)
        builder.add_edge("source", b)
    builder.add_edge(START, "source")
    builder.add_edge(branches, "join")
    builder.add_edge("join", END)
    return builder.compile()


async def measure(width: int, seconds: float, reps: int) -> dict[str, Any]:
    spec = fanout_spec(f"bench-waits-{width}", width, {"agent": "wait", "seconds": seconds})
    graph = parse_graph(spec, registry())
    app = langgraph_waits(width, seconds)
    with tempfile.TemporaryDirectory(prefix="braid-bench-") as folder:
        sqlite = SqliteRuns(Path(folder))
        await sqlite.store.start()
        try:
            walls = await take_turns(
                {
                    "braid_memory": lambda: braid_memory(graph),
                    "braid_sqlite": lambda: sqlite.run(graph),
                    "langgraph": lambda: langgraph_run(app, width + 2),
                },
                reps,
                warm_up=False,
            )
        finally:
            await sqlite.store.close()
    return {
        "width": width,
        "seconds": seconds,
        "reps": reps,
        "wall_seconds": {k: median(v) for k, v in walls.items()},
        "all_seconds": walls,
    }


def report(results: dict[str, Any]) -> str:
    rows = [
        [name, wall, "yes" if wall <= TARGET_SECONDS else "no"]
        for name, wall in results["wall_seconds"].items()
    ]
    title = (
        f"Parallel waits: {results['width']:,} branches x {results['seconds']:g} s, "
        f"wall time (median of {results['reps']})"
    )
    return table(
        title, ["engine", "seconds", f"≤ {TARGET_SECONDS} s"], [[r[0], f"{r[1]:.3f}", r[2]] for r in rows]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.parallel_waits", description=__doc__)
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    results = anyio.run(measure, args.width, args.seconds, args.reps)
    print(report(results), flush=True)
    return results


if __name__ == "__main__":
    main()
