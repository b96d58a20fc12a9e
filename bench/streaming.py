"""Streaming: how fast Braid gets events to SSE clients (an embedded `braid serve` on SQLite, or
with ``--distributed`` an API process and a worker on Postgres + Redis).

    uv run --group bench python -m bench.streaming [--clients 60] [--rounds 3] [--subscribers 1000]
        [--distributed]

1. ``--clients`` runs of a 3-node chain started at once (the server executing all of them at
   once: BRAID_WORKER_CONCURRENCY is at least ``--clients``), each with ``POST /graphs/{name}/runs
   ?stream=true``: POST → ``workflow.started`` and POST → ``workflow.finished`` at the client,
   over ``--rounds`` rounds (after one warm-up round). Target: p99 POST → started < 50 ms at 60.
2. ``--subscribers`` clients of ``GET /runs/{id}/events`` on one run (a ``wait`` of ``--hold`` s,
   then a template node): the delay from each ``node.completed`` event's ``at`` to its receipt,
   counted for subscribers connected before the event. The clients share the machine (and one
   event loop), so their own lag is in the figure.

With ``--distributed`` the server is one API process (``braid serve``) and one ``braid worker`` on
Postgres and Redis (a fresh database and an empty Redis database, as ``bench.distributed`` uses),
so the SSE streams are fed through Redis; the CPU a run is then the two processes' together.

The clients are ``bench.client`` connections (keep-alive HTTP/1.1, parsed by httptools), not
httpx: httpx cost about as much CPU per streamed run as the server, on the same two cores. The
client process freezes what it holds before measuring and collects its garbage between rounds,
as ``take_turns`` does for the engine benchmarks: run by ``python -m bench`` after the other
benchmarks, its heap (LangGraph, their results) made full collections of 50 to 140 ms, which a
round caught now and then (p99 202 ms where the server took 40).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import httpx

from bench.client import Connection
from bench.common import (
    Child,
    Skipped,
    child_env,
    children,
    cpu_seconds,
    free_port,
    percentile,
    spawn,
    table,
    wait_healthy,
)
from bench.distributed import braid_services, check_services

CHAIN = "bench-stream3"
HOLD = "bench-hold"
TARGET_STARTED_P99_MS = 50.0
DEFAULT_WORKER_CONCURRENCY = 32


def worker_concurrency(clients: int) -> int:
    """The server's BRAID_WORKER_CONCURRENCY: enough for every concurrent run at once."""
    return max(DEFAULT_WORKER_CONCURRENCY, clients)


def chain_spec() -> dict[str, Any]:
    nodes = {f"n{i}": {"agent": "template", "template": f"step {i}"} for i in range(3)}
    edges = [{"from": "n0", "to": "n1"}, {"from": "n1", "to": "n2"}]
    return {"name": CHAIN, "nodes": nodes, "edges": edges}


def hold_spec(seconds: float) -> dict[str, Any]:
    return {
        "name": HOLD,
        "nodes": {
            "hold": {"agent": "wait", "seconds": seconds},
            "ping": {"agent": "template", "template": "pong"},
        },
        "edges": [{"from": "hold", "to": "ping"}],
    }


def _at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["at"]).timestamp()


# --- 1. runs streamed from their POST ------------------------------------------------------------


async def streamed_round(connections: list[Connection]) -> tuple[list[float], list[float]]:
    started: list[float] = []
    finished: list[float] = []
    go = anyio.Event()

    async def one(connection: Connection) -> None:
        await go.wait()
        began = time.time()
        path = f"/graphs/{CHAIN}/runs?stream=true"
        async for received, event in connection.stream("POST", path, {}):
            if event is None:
                continue
            if event["type"] == "workflow.started":
                started.append(received - began)
            elif event["type"] == "workflow.finished":
                if event.get("status") != "succeeded":
                    raise RuntimeError(f"a run ended {event.get('status')}: {event.get('error')}")
                finished.append(received - began)

    async with anyio.create_task_group() as tg:
        for connection in connections:
            tg.start_soon(one, connection)
        await anyio.sleep(0.05)  # every client waiting on ``go``: they all start together
        go.set()
    return started, finished


def settle_client() -> None:
    """The client's own pauses out of the figures: what this process holds frozen out of the
    garbage collector's reach (see the module's docstring)."""
    gc.collect()
    gc.freeze()


def _cpu(pids: list[int]) -> float | None:
    seconds = [cpu_seconds(pid) for pid in pids]
    return None if any(s is None for s in seconds) else sum(s for s in seconds if s is not None)


async def measure_streamed(url: str, clients: int, rounds: int, server_pids: list[int]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        response = await client.put(f"/graphs/{CHAIN}", json=chain_spec())
        response.raise_for_status()
    connections = [Connection.to(url) for _ in range(clients)]
    try:
        await streamed_round(connections)  # warm-up (and the connections opened)
        started: list[float] = []
        finished: list[float] = []
        settle_client()
        cpu_before = _cpu(server_pids)
        for _ in range(rounds):
            gc.collect()
            s, f = await streamed_round(connections)
            started += s
            finished += f
        cpu_after = _cpu(server_pids)
    finally:
        for connection in connections:
            await connection.close()
    return {
        "clients": clients,
        "connections_opened": sum(c.opened for c in connections),
        "worker_concurrency": worker_concurrency(clients),
        "rounds": rounds,
        "started_ms": {"p50": percentile(started, 50) * 1e3, "p99": percentile(started, 99) * 1e3},
        "finished_ms": {"p50": percentile(finished, 50) * 1e3, "p99": percentile(finished, 99) * 1e3},
        # The server's CPU time (every thread) per run: the floor under a burst's latency.
        "server_cpu_ms_per_run": (
            None
            if cpu_before is None or cpu_after is None
            else (cpu_after - cpu_before) * 1e3 / (clients * rounds)
        ),
    }


# --- 2. many subscribers on one run --------------------------------------------------------------


async def measure_fanout(url: str, subscribers: int, hold: float) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        (await client.put(f"/graphs/{HOLD}", json=hold_spec(hold))).raise_for_status()
        response = await client.post(f"/graphs/{HOLD}/runs", json={})
        response.raise_for_status()
        run_id = response.json()["id"]
    settle_client()
    posted = time.time()
    connected: list[float] = []
    delays: list[float] = []
    late = 0
    failures: list[str] = []

    async def subscribe() -> None:
        nonlocal late
        connection = Connection.to(url)
        since = 0.0
        try:
            async for received, event in connection.stream("GET", f"/runs/{run_id}/events"):
                if event is None:
                    since = received
                    connected.append(since - posted)
                elif event["type"] == "node.completed":
                    at = _at(event)
                    if at >= since:
                        delays.append(received - at)
                    else:
                        late += 1
        except (OSError, ConnectionError) as exc:
            failures.append(str(exc) or type(exc).__name__)
        finally:
            await connection.close()

    with anyio.fail_after(hold + 120):
        async with anyio.create_task_group() as tg:
            for _ in range(subscribers):
                tg.start_soon(subscribe)
    return {
        "subscribers": subscribers,
        "hold_seconds": hold,
        "connected": len(connected),
        "all_connected_after_s": max(connected) if connected else None,
        "failures": len(failures),
        "first_failure": failures[0] if failures else None,
        "live_deliveries": len(delays),
        "replayed_deliveries": late,
        "delivery_ms": {
            "p50": percentile(delays, 50) * 1e3,
            "p99": percentile(delays, 99) * 1e3,
            "max": max(delays) * 1e3 if delays else float("nan"),
        },
    }


# --- the server ----------------------------------------------------------------------------------


async def measure(
    clients: int, rounds: int, subscribers: int, hold: float, distributed: bool = False
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="braid-bench-") as name:
        folder = Path(name)
        (folder / "examples").mkdir()
        (folder / "prompts").mkdir()
        port = free_port()
        settings = {
            "BRAID_HOST": "127.0.0.1",
            "BRAID_PORT": str(port),
            "BRAID_EXAMPLES_DIR": str(folder / "examples"),
            "BRAID_PROMPTS_DIR": str(folder / "prompts"),
            # Every one of the concurrent runs executes at once (the default, 32, would queue the rest).
            "BRAID_WORKER_CONCURRENCY": str(worker_concurrency(clients)),
        }
        if not distributed:
            env = child_env(BRAID_DATABASE_URL=f"sqlite+aiosqlite:///{folder / 'bench.db'}", **settings)
            results = await _measure_server(env, folder, port, clients, rounds, subscribers, hold, workers=0)
            return {"mode": "embedded: one braid serve, SQLite", **results}
        check_services()
        async with braid_services() as services:
            env = child_env(**services.env, **settings)
            results = await _measure_server(env, folder, port, clients, rounds, subscribers, hold, workers=1)
        return {"mode": "distributed: 1 API process, 1 worker, Postgres + Redis", **results}


async def _measure_server(
    env: dict[str, str],
    folder: Path,
    port: int,
    clients: int,
    rounds: int,
    subscribers: int,
    hold: float,
    *,
    workers: int,
) -> dict[str, Any]:
    with children() as started:
        api: Child = spawn(started, "api", ["-m", "server.cli", "serve"], folder, env)
        processes = [api] + [
            spawn(started, f"worker{i}", ["-m", "server.cli", "worker"], folder, env)
            for i in range(1, workers + 1)
        ]
        url = f"http://127.0.0.1:{port}"
        try:
            await anyio.to_thread.run_sync(lambda: wait_healthy(url, processes))
            pids = [p.process.pid for p in processes]
            results: dict[str, Any] = {"streamed": await measure_streamed(url, clients, rounds, pids)}
            if subscribers:
                results["subscribers"] = await measure_fanout(url, subscribers, hold)
        except Exception as exc:
            logs = "\n".join(f"--- {p.name}\n{p.log(2000)}" for p in processes)
            raise RuntimeError(f"the streaming benchmark failed: {exc}\n{logs}") from exc
    return results


def report(results: dict[str, Any]) -> str:
    s = results["streamed"]
    mode = results.get("mode", "embedded")
    verdict = "yes" if s["started_ms"]["p99"] < TARGET_STARTED_P99_MS else "no"
    out = table(
        f"Streaming ({mode}): {s['clients']} concurrent runs, POST ?stream=true ({s['rounds']} "
        f"rounds, BRAID_WORKER_CONCURRENCY={s['worker_concurrency']}), ms at the client",
        ["measure", "p50", "p99", f"p99 < {TARGET_STARTED_P99_MS:g}"],
        [
            ["POST → workflow.started", s["started_ms"]["p50"], s["started_ms"]["p99"], verdict],
            ["POST → workflow.finished", s["finished_ms"]["p50"], s["finished_ms"]["p99"], ""],
        ],
    )
    cpu = s.get("server_cpu_ms_per_run")
    if cpu is not None:
        out += (
            f"\nserver CPU per run: {cpu:.2f} ms, so {cpu * s['clients']:.0f} ms for a burst of "
            f"{s['clients']} (every thread of the server's processes)"
        )
    f = results.get("subscribers")
    if f:
        d = f["delivery_ms"]
        out += "\n\n" + table(
            f"Streaming: {f['subscribers']:,} SSE subscribers on one run, node.completed delivery, ms",
            ["connected", "live deliveries", "p50", "p99", "max", "failures"],
            [
                [
                    f"{f['connected']:,}",
                    f"{f['live_deliveries']:,}",
                    d["p50"],
                    d["p99"],
                    d["max"],
                    f["failures"],
                ]
            ],
        )
        if f["all_connected_after_s"] is not None:
            out += f"\n(last subscriber connected {f['all_connected_after_s']:.2f} s after the POST)"
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__)
    parser.add_argument("--clients", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--hold", type=float, default=10.0, help="seconds the subscribed run waits first")
    parser.add_argument(
        "--distributed", action="store_true", help="an API process and a worker on Postgres + Redis"
    )
    args = parser.parse_args(argv)
    try:
        results = anyio.run(measure, args.clients, args.rounds, args.subscribers, args.hold, args.distributed)
    except Skipped as exc:
        print(f"streaming: skipped: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(report(results), flush=True)
    return results


if __name__ == "__main__":
    main()
