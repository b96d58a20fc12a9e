"""Distributed throughput: Braid (Postgres + Redis, one API process, two workers) against Celery
(same Redis, two prefork worker processes), N runs of a 3-node no-op chain each.

    uv run --group bench python -m bench.distributed [--runs 2000] [--concurrency 32] [--watch feed]

Braid: a fresh Postgres database (dropped afterwards) and an empty Redis database (Braid's keys
deleted afterwards); `python -m server.cli serve` and two `python -m server.cli worker`; runs of
three `template` nodes submitted through `POST /graphs/{name}/runs` over ``--concurrency`` keep-alive
connections (``bench.client``: httpx's pool cost more CPU than the API process it measured, on the
same two cores); completion watched in Postgres (a count of ended runs every 50 ms, as Celery's is seen
through its result backend; ``--watch feed`` follows the API's `GET /events` feed instead, which costs
the API process about a third of its CPU). Latencies are
the run's `started_at` / `finished_at` (server clock, same machine) minus the client's POST time.
Celery: `chain(noop, noop, noop)` through `celery -A bench.celery_app worker -P prefork
--concurrency=2`; the finish time is the last task's `date_done`.
Targets: ≥ 1,000 durable node executions/s and ≥ 1.0x Celery.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx

from bench.client import Connection
from bench.common import (
    POSTGRES_URL,
    REDIS_URL,
    Child,
    Skipped,
    child_env,
    children,
    cpu_seconds,
    free_port,
    percentile,
    spawn,
    table,
    token,
    wait_healthy,
)

NODES = 3
GRAPH = "bench-chain3"
TARGET_NODES_PER_SECOND = 1000.0
TIMEOUT_SECONDS = 180.0
CELERY_PATTERNS = ("celery*", "_kombu*", "unacked*")


def chain3_spec() -> dict[str, Any]:
    nodes = {f"n{i}": {"agent": "template", "template": f"step {i}"} for i in range(NODES)}
    edges = [{"from": f"n{i}", "to": f"n{i + 1}"} for i in range(NODES - 1)]
    return {"name": GRAPH, "description": "benchmark: a 3-node no-op chain", "nodes": nodes, "edges": edges}


def _timestamp(value: Any) -> float:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


# --- services ------------------------------------------------------------------------------------


def check_services() -> None:
    from urllib.parse import urlsplit

    from bench.common import reachable

    for name, url in (("PostgreSQL", POSTGRES_URL), ("Redis", REDIS_URL)):
        parts = urlsplit(url)
        if not reachable(parts.hostname or "127.0.0.1", parts.port or 0):
            raise Skipped(f"{name} is not reachable at {parts.hostname}:{parts.port} (set BRAID_BENCH_*_URL)")


async def create_database() -> tuple[str, str]:
    """A new Postgres database: (its name, its asyncpg URL for Braid)."""
    import asyncpg

    name = f"braid_bench_{token()}"
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    server = POSTGRES_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return name, f"{server}/{name}"


async def drop_database(name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def empty_redis_db(preferred: tuple[int, ...], patterns: tuple[str, ...]) -> int:
    """The first Redis database in ``preferred`` that holds no key matching ``patterns``.

    Braid's settings have no key prefix, so a Braid run needs a database that nobody else's
    ``braid:*`` keys (the tests pick databases 2-15 at random) share."""
    import redis

    for db in preferred:
        client = redis.Redis.from_url(f"{REDIS_URL}/{db}")
        try:
            if not any(next(iter(client.scan_iter(match=p, count=1000)), None) for p in patterns):
                return db
        finally:
            client.close()
    raise Skipped(f"no Redis database among {preferred} is free of {patterns} keys")


def delete_keys(db: int, patterns: tuple[str, ...]) -> int:
    import redis

    client = redis.Redis.from_url(f"{REDIS_URL}/{db}")
    deleted = 0
    try:
        for pattern in patterns:
            keys = list(client.scan_iter(match=pattern, count=1000))
            for i in range(0, len(keys), 500):
                deleted += int(client.delete(*keys[i : i + 500]))
    finally:
        client.close()
    return deleted


# --- Braid ---------------------------------------------------------------------------------------


async def drive_braid(url: str, runs: int, concurrency: int, watch: str, database_url: str) -> dict[str, Any]:
    """Submit ``runs`` runs from ``concurrency`` connections, wait for all to finish (watching
    the database, or the API's ``/events`` feed), return the timings."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        response = await client.put(f"/graphs/{GRAPH}", json=chain3_spec())
        if response.status_code not in (200, 201):
            raise RuntimeError(f"PUT /graphs/{GRAPH}: {response.status_code} {response.text[:500]}")
        warm = await client.post(f"/graphs/{GRAPH}/runs", params={"wait": "true", "timeout": "30"}, json={})
        if warm.status_code != 200 or warm.json().get("status") != "succeeded":
            raise RuntimeError(f"a first run did not succeed: {warm.status_code} {warm.text[:500]}")

    finished: set[str] = set()
    posted: dict[str, float] = {}
    all_done = anyio.Event()
    feed_ready = anyio.Event()
    heard = time.monotonic()

    def check_done() -> None:
        if len(posted) == runs and finished.issuperset(posted):
            all_done.set()

    async def follow_feed() -> None:
        nonlocal heard
        connection = Connection.to(url)
        async for _, event in connection.stream("GET", "/events"):
            heard = time.monotonic()
            if event is None:
                feed_ready.set()
            elif event.get("type") == "workflow.finished":
                finished.add(event["run_id"])
                check_done()

    async def watch_database() -> None:
        # Like Celery's result backend: the count of ended runs, read from Postgres every 50 ms
        # (the feed cost the API process about a third of its CPU, beside the workers it measures).
        import asyncpg

        conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://", 1))
        try:
            query = "SELECT count(*) FROM runs WHERE status IN ('succeeded', 'failed', 'cancelled')"
            before = await conn.fetchval(query)
            feed_ready.set()
            while True:
                await anyio.sleep(0.05)
                if len(posted) == runs and await conn.fetchval(query) - before >= runs:
                    finished.update(posted)
                    check_done()
        finally:
            await conn.close()

    async def poll_stragglers() -> None:
        # A safety net in case the feed misses something: when it has been quiet for a while, ask
        # for runs it has not reported (not before: polling would load the server it measures).
        connection = Connection.to(url)
        while True:
            await anyio.sleep(1)
            if time.monotonic() - heard < 3:
                continue
            for run_id in [r for r in posted if r not in finished][:50]:
                run = (await connection.request("GET", f"/runs/{run_id}")).json()
                if run.get("finished_at"):
                    finished.add(run_id)
            check_done()

    errors: list[str] = []
    connections = [Connection.to(url) for _ in range(min(concurrency, runs))]
    numbers = iter(range(runs))

    async def submit(connection: Connection) -> None:
        for i in numbers:
            began = time.time()
            response = await connection.request("POST", f"/graphs/{GRAPH}/runs", {"input": {"i": i}})
            if response.status != 202:
                errors.append(f"{response.status} {response.body[:200]!r}")
                continue
            posted[response.json()["id"]] = began
            check_done()

    first_post = submitted = done_at = 0.0
    waiting = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(follow_feed if watch == "feed" else watch_database)
        with anyio.fail_after(10):
            await feed_ready.wait()
        if watch == "feed":
            tg.start_soon(poll_stragglers)
        first_post = time.time()
        async with anyio.create_task_group() as submitters:
            for connection in connections:
                submitters.start_soon(submit, connection)
        submitted = time.time()
        if errors:
            raise RuntimeError(f"{len(errors)} POSTs failed, the first: {errors[0]}")
        with anyio.move_on_after(TIMEOUT_SECONDS) as waiting:
            await all_done.wait()
        done_at = time.time()
        tg.cancel_scope.cancel()
    if waiting.cancelled_caught:
        missing = len(set(posted) - finished)
        raise RuntimeError(f"{missing} of {runs} runs had not finished after {TIMEOUT_SECONDS:g}s")

    fetched: list[dict[str, Any]] = []
    run_ids = iter(list(posted))

    async def fetch(connection: Connection) -> None:
        for run_id in run_ids:
            fetched.append((await connection.request("GET", f"/runs/{run_id}")).json())

    async with anyio.create_task_group() as tg:
        for connection in connections:
            tg.start_soon(fetch, connection)
    for connection in connections:
        await connection.close()

    statuses = [run["status"] for run in fetched]
    failed = [s for s in statuses if s != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {runs} runs did not succeed: {sorted(set(failed))}")
    started = [_timestamp(r["started_at"]) - posted[r["id"]] for r in fetched]
    ended = [_timestamp(r["finished_at"]) - posted[r["id"]] for r in fetched]
    last = max(_timestamp(r["finished_at"]) for r in fetched)
    return summary(runs, first_post, submitted, max(last, first_post), done_at, started, ended)


def summary(
    runs: int,
    first: float,
    submitted: float,
    last: float,
    observed: float,
    started: list[float],
    ended: list[float],
) -> dict[str, Any]:
    seconds = last - first
    return {
        "runs": runs,
        "seconds": seconds,
        "submit_seconds": submitted - first,
        "client_seconds": observed - first,
        "runs_per_second": runs / seconds,
        "nodes_per_second": runs * NODES / seconds,
        "started_ms": {"p50": percentile(started, 50) * 1e3, "p99": percentile(started, 99) * 1e3},
        "finished_ms": {"p50": percentile(ended, 50) * 1e3, "p99": percentile(ended, 99) * 1e3},
    }


@dataclass
class BraidServices:
    """A fresh Postgres database and an empty Redis database for one Braid deployment."""

    database_url: str
    redis_db: int

    @property
    def env(self) -> dict[str, str]:
        """Their settings for Braid's processes."""
        return {"BRAID_DATABASE_URL": self.database_url, "BRAID_REDIS_URL": f"{REDIS_URL}/{self.redis_db}"}


@asynccontextmanager
async def braid_services() -> AsyncIterator[BraidServices]:
    """``BraidServices``, the database dropped and Braid's Redis keys deleted afterwards."""
    db_name, database_url = await create_database()
    try:
        redis_db = empty_redis_db((1, *range(15, 1, -1)), ("braid:*",))
        try:
            yield BraidServices(database_url, redis_db)
        finally:
            delete_keys(redis_db, ("braid:*",))
    finally:
        await drop_database(db_name)


async def run_braid(runs: int, concurrency: int, folder: Path, watch: str = "database") -> dict[str, Any]:
    port = free_port()
    (folder / "examples").mkdir(parents=True, exist_ok=True)
    (folder / "prompts").mkdir(parents=True, exist_ok=True)
    async with braid_services() as services:
        env = child_env(
            BRAID_HOST="127.0.0.1",
            BRAID_PORT=str(port),
            BRAID_EXAMPLES_DIR=str(folder / "examples"),
            BRAID_PROMPTS_DIR=str(folder / "prompts"),
            **services.env,
        )
        with children() as started:
            api = spawn(started, "api", ["-m", "server.cli", "serve"], folder, env)
            workers = [
                spawn(started, f"worker{i}", ["-m", "server.cli", "worker"], folder, env) for i in (1, 2)
            ]
            watched: list[Child] = [api, *workers]
            url = f"http://127.0.0.1:{port}"
            try:
                await anyio.to_thread.run_sync(lambda: wait_healthy(url, watched))
                for worker in workers:
                    worker.check()
                before = [cpu_seconds(c.process.pid) for c in watched]
                result = await drive_braid(url, runs, concurrency, watch, services.database_url)
                after = [cpu_seconds(c.process.pid) for c in watched]
                result["cpu_ms_per_run"] = cpu_per_run(before, after, runs)
            except Exception as exc:
                logs = "\n".join(f"--- {c.name} (last lines)\n{c.log(1500)}" for c in watched)
                raise RuntimeError(
                    f"Braid's distributed mode did not complete the benchmark: {exc}\n{logs}"
                ) from exc
        return result | {"redis_db": services.redis_db}


# --- Celery --------------------------------------------------------------------------------------


def drive_celery(url: str, runs: int) -> dict[str, Any]:
    from celery import chain

    from bench.celery_app import NOOP, make_app

    client = make_app(url)

    def submit(i: int) -> Any:
        return chain(
            client.signature(NOOP, args=(i,)), client.signature(NOOP), client.signature(NOOP)
        ).apply_async()

    if submit(-1).get(timeout=60) != -1:
        raise RuntimeError("Celery's first chain gave a wrong result")
    posted: list[tuple[Any, float]] = []
    first = time.time()
    for i in range(runs):
        began = time.time()
        posted.append((submit(i), began))
    submitted = time.time()
    deadline = first + TIMEOUT_SECONDS
    for result, _ in posted:
        result.get(timeout=max(1.0, deadline - time.time()))
    observed = time.time()
    ended = [_timestamp(result.date_done) - began for result, began in posted]
    last = max(_timestamp(result.date_done) for result, _ in posted)
    client.close()
    return summary(runs, first, submitted, last, observed, [], ended)


def cpu_per_run(before: list[float | None], after: list[float | None], runs: int) -> dict[str, float] | None:
    """The API's and the workers' CPU time per run (every thread); None where /proc does not tell."""
    if None in before or None in after:
        return None
    spent = [(b or 0.0) - (a or 0.0) for a, b in zip(before, after, strict=True)]
    return {"api": spent[0] * 1e3 / runs, "workers": sum(spent[1:]) * 1e3 / runs}


def run_celery(runs: int, folder: Path) -> dict[str, Any]:
    db = empty_redis_db((5, 6, 7, 8, 10, 11, 12, 14), CELERY_PATTERNS)
    url = f"{REDIS_URL}/{db}"
    env = child_env(BENCH_CELERY_URL=url)
    args = [
        "-m",
        "celery",
        "-A",
        "bench.celery_app",
        "worker",
        "-P",
        "prefork",
        "--concurrency=2",
        "--loglevel=WARNING",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    try:
        with children() as started:
            worker = spawn(started, "celery", args, folder, env)
            try:
                return drive_celery(url, runs) | {"redis_db": db}
            except Exception as exc:
                raise RuntimeError(
                    f"the Celery benchmark failed: {exc}\n--- celery\n{worker.log(1500)}"
                ) from exc
    finally:
        delete_keys(db, CELERY_PATTERNS)


# --- report --------------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> str:
    rows = []
    for name in ("braid", "celery"):
        r = results.get(name)
        if not r:
            continue
        rows.append(
            [
                name,
                r["runs"],
                r["runs_per_second"],
                r["nodes_per_second"],
                r["started_ms"]["p50"],
                r["started_ms"]["p99"],
                r["finished_ms"]["p50"],
                r["finished_ms"]["p99"],
            ]
        )
    headers = [
        "system",
        "runs",
        "runs/s",
        "nodes/s",
        "start p50 ms",
        "start p99",
        "finish p50 ms",
        "finish p99",
    ]
    watched = {"database": "a count in Postgres", "feed": "the API's /events feed"}[
        results.get("watch", "feed")
    ]
    title = f"Distributed throughput (3-node chains, 2 worker processes; Braid's ends seen through {watched})"
    out = table(title, headers, rows)
    if "ratio" in results:
        verdict = "≥" if results["braid"]["nodes_per_second"] >= TARGET_NODES_PER_SECOND else "<"
        out += (
            f"\nBraid/Celery runs/s: {results['ratio']:.2f}x   "
            f"Braid durable nodes/s {verdict} {TARGET_NODES_PER_SECOND:,.0f} target"
        )
    cpu = results.get("braid", {}).get("cpu_ms_per_run")
    if cpu:
        out += f"\nBraid CPU per run: API {cpu['api']:.2f} ms, the two workers {cpu['workers']:.2f} ms"
    return out


DEFAULT_RUNS = 2000
"""Runs per system: the issue's fixed count, long enough (several seconds) that start-up and the
last stragglers weigh little."""


WATCHES = ("database", "feed")


def measure(runs: int, concurrency: int, watch: str = "database") -> dict[str, Any]:
    check_services()
    results: dict[str, Any] = {"runs": runs, "concurrency": concurrency, "watch": watch}
    with tempfile.TemporaryDirectory(prefix="braid-bench-") as folder:
        results["braid"] = anyio.run(run_braid, runs, concurrency, Path(folder) / "braid", watch)
        results["celery"] = run_celery(runs, Path(folder) / "celery")
    results["ratio"] = results["braid"]["runs_per_second"] / results["celery"]["runs_per_second"]
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__)
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    parser.add_argument("--concurrency", type=int, default=32, help="POST requests in flight at most")
    parser.add_argument(
        "--watch",
        choices=WATCHES,
        default="database",
        help="how the end of Braid's runs is seen: a count in Postgres, or the API's /events feed",
    )
    args = parser.parse_args(argv)
    try:
        results = measure(args.runs, args.concurrency, args.watch)
    except Skipped as exc:
        print(f"distributed: skipped: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(report(results), flush=True)
    return results


if __name__ == "__main__":
    main()
