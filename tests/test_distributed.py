"""Distributed mode as a user runs it: ``braid serve`` and ``braid worker`` processes on one
PostgreSQL database and one Redis (DESIGN.md, "Deployment modes" and "Durability").

The module starts two API processes and two workers on a fresh database and its own Redis key
prefix. The ``count`` agent (tests/dist_agents.py) logs every execution of a node with the pid of
the process that ran it, so the tests can say exactly which node ran how often, and where.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import anyio
import asyncpg
import httpx
import pytest
import redis
from litestar.testing import AsyncTestClient

from server.bus.redis import decode
from server.config import Settings
from server.keys import Keys
from server.queue.redis import RedisQueue
from server.runner import MAX_DELIVERIES
from server.status import EventType
from tests.server_process import free_port
from tests.services import require_postgres, require_redis

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

ROOT = Path(__file__).resolve().parent.parent
RECLAIM_IDLE_MS = 3000
"""A dead worker's runs are taken over after 3 s; lost runs are swept after 6 s."""
WORKER_CONCURRENCY = 8
SLOW_SECONDS = 1.5
CLEARED = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "BRAID_PROVIDERS", "BRAID_TEMPLATE_ENV")

T = TypeVar("T")


def chain(name: str) -> dict[str, Any]:
    """``a → slow → c``: two side-effect counters around a timer."""
    return {
        "name": name,
        "nodes": {
            "a": {"agent": "count"},
            "slow": {"agent": "wait", "seconds": SLOW_SECONDS},
            "c": {"agent": "count"},
        },
        "edges": [{"from": "a", "to": "slow"}, {"from": "slow", "to": "c"}],
    }


def wait_for(condition: Callable[[], T | None], within: float, what: str) -> T:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        time.sleep(0.05)  # the poll interval; the deadline bounds the wait


# --- PostgreSQL ---------------------------------------------------------------------------------


def asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def sql(dsn: str, statement: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            if args or statement.lstrip().upper().startswith("SELECT"):
                return await conn.fetch(statement, *args)
            await conn.execute(statement)
            return []
        finally:
            await conn.close()

    return anyio.run(go)


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A fresh database for this module (dropped afterwards): its SQLAlchemy URL."""
    base = require_postgres()
    name = f"braid_dist_{uuid.uuid4().hex[:12]}"
    admin = asyncpg_dsn(base)
    sql(admin, f'CREATE DATABASE "{name}"')
    try:
        yield f"{base.rsplit('/', 1)[0]}/{name}"
    finally:
        sql(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def delete_keys(url: str, pattern: str) -> None:
    with redis.Redis.from_url(url) as client:
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)


# --- processes ----------------------------------------------------------------------------------


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def kill(self) -> None:
        """``kill -9``: the process dies mid-work, with no chance to clean up."""
        self.popen.kill()
        self.popen.wait()

    def wait(self, within: float) -> int:
        try:
            return self.popen.wait(within)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} did not exit within {within} s:\n{self.log()[-3000:]}"
            ) from None

    def terminate(self, within: float = 30.0) -> int:
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
        return self.wait(within)


class Execution(NamedTuple):
    run: str
    node: str
    iteration: int
    pid: int


@dataclass
class Cluster:
    folder: Path
    env: dict[str, str]
    redis_url: str
    database_dsn: str
    prefix: str
    fx_key: str
    apis: list[Process] = field(default_factory=list[Process])
    workers: list[Process] = field(default_factory=list[Process])

    def _spawn(self, name: str, command: str, port: int | None = None) -> Process:
        env = dict(self.env)
        if port is not None:
            env["BRAID_PORT"] = str(port)
        log_path = self.folder / f"{name}.log"
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                [sys.executable, "-m", "server.cli", command],
                cwd=ROOT,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}" if port is not None else ""
        return Process(name, popen, log_path, url)

    def _ready(self, process: Process, within: float = 60.0) -> None:
        def ready() -> bool:
            if not process.alive:
                raise AssertionError(f"{process.name} exited:\n{process.log()[-3000:]}")
            if process.url:
                try:
                    return httpx.get(f"{process.url}/health", timeout=2).status_code == 200
                except httpx.TransportError:
                    return False
            return "Braid worker:" in process.log()

        wait_for(ready, within, f"{process.name} to start")

    def start(self, apis: int = 0, workers: int = 0) -> None:
        """Start processes together (they boot in parallel), then wait until each is ready."""
        started = [self._spawn(f"api{len(self.apis) + i}", "serve", free_port()) for i in range(apis)]
        self.apis += started
        new_workers = [self._spawn(f"worker{len(self.workers) + i}", "worker") for i in range(workers)]
        self.workers += new_workers
        for process in [*started, *new_workers]:
            self._ready(process)

    def live_workers(self) -> list[Process]:
        return [w for w in self.workers if w.alive]

    def ensure_workers(self, count: int) -> list[Process]:
        missing = count - len(self.live_workers())
        if missing > 0:
            self.start(workers=missing)
        return self.live_workers()[:count]

    def executions(self, run_ids: Iterator[str] | list[str] | set[str] | None = None) -> list[Execution]:
        """Every execution of a ``count`` node so far, in the order they happened."""
        with redis.Redis.from_url(self.redis_url, decode_responses=True) as client:
            lines: list[str] = client.lrange(self.fx_key, 0, -1)  # pyright: ignore[reportAssignmentType]
        wanted = None if run_ids is None else set(run_ids)
        found: list[Execution] = []
        for line in lines:
            run, node, iteration, pid = line.split()
            if wanted is None or run in wanted:
                found.append(Execution(run, node, int(iteration), int(pid)))
        return found

    def completed_nodes(self, run_ids: list[str]) -> set[tuple[str, str, int]]:
        """The node executions whose completion is persisted, straight from the database."""
        rows = sql(
            self.database_dsn,
            "SELECT run_id, node, iteration FROM node_executions WHERE status = 'succeeded' "
            "AND run_id = ANY($1::text[])",
            run_ids,
        )
        return {(row["run_id"], row["node"], row["iteration"]) for row in rows}

    def queued_count(self, run_ids: list[str]) -> int:
        rows = sql(
            self.database_dsn,
            "SELECT count(*) AS n FROM runs WHERE status = 'queued' AND id = ANY($1::text[])",
            run_ids,
        )
        return int(rows[0]["n"])


@contextmanager
def running_cluster(
    folder: Path,
    database: str,
    redis_url: str,
    prefix: str,
    *,
    apis: int,
    workers: int,
    fx_key: str | None = None,
) -> Generator[Cluster]:
    """``apis`` ``braid serve`` and ``workers`` ``braid worker`` processes on ``database`` and
    ``redis_url`` under the key prefix ``prefix``, as a user runs them; stopped (SIGTERM) and their
    Redis keys deleted on the way out. With ``fx_key``, the ``count`` agent of tests/dist_agents.py
    logs its executions there."""
    (folder / "examples").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in (*CLEARED, "BRAID_AGENT_MODULES")}
    env.update(
        BRAID_DATABASE_URL=database,
        BRAID_REDIS_URL=redis_url,
        BRAID_REDIS_PREFIX=prefix,
        BRAID_RECLAIM_IDLE_MS=str(RECLAIM_IDLE_MS),
        BRAID_WORKER_CONCURRENCY=str(WORKER_CONCURRENCY),
        BRAID_EXAMPLES_DIR=str(folder / "examples"),
        BRAID_PROMPTS_DIR=str(ROOT / "prompts"),
        BRAID_HOST="127.0.0.1",
        BRAID_MOCK_DELAY="0",
        PYTHONUNBUFFERED="1",
    )
    if fx_key is not None:
        env.update(
            BRAID_AGENT_MODULES="tests.dist_agents", BRAID_TEST_FX_REDIS=redis_url, BRAID_TEST_FX_KEY=fx_key
        )
    cluster = Cluster(folder, env, redis_url, asyncpg_dsn(database), prefix, fx_key or f"{prefix}-unused")
    try:
        cluster.start(apis=apis, workers=workers)
        yield cluster
    finally:
        for process in [*cluster.workers, *cluster.apis]:
            if process.alive:
                process.popen.send_signal(signal.SIGTERM)
        for process in [*cluster.workers, *cluster.apis]:
            process.wait(30)
        delete_keys(redis_url, Keys(prefix).pattern)
        if fx_key is not None:
            delete_keys(redis_url, fx_key)


@pytest.fixture(scope="module")
def cluster(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two ``braid serve`` processes and two ``braid worker`` processes, as a user runs them."""
    prefix = f"braid-dist-{uuid.uuid4().hex[:10]}"
    fx_key = f"{prefix}-fx:executions"  # outside the prefix's keys: survives the data-loss test
    folder = tmp_path_factory.mktemp("distributed")
    redis_url = require_redis()
    with running_cluster(folder, database, redis_url, prefix, apis=2, workers=2, fx_key=fx_key) as cluster:
        yield cluster


# --- talking to the API -------------------------------------------------------------------------


def put_graph(api: Process, spec: dict[str, Any]) -> None:
    response = httpx.put(f"{api.url}/graphs/{spec['name']}", json=spec, timeout=10)
    assert response.status_code in (200, 201), response.text


def start_runs(api: Process, graph: str, count: int) -> list[str]:
    with httpx.Client(base_url=api.url, timeout=10) as http:
        ids: list[str] = []
        for _ in range(count):
            response = http.post(f"/graphs/{graph}/runs", json={"input": {}})
            assert response.status_code == 202, response.text
            assert response.json()["status"] == "queued"
            ids.append(response.json()["id"])
        return ids


def get_run(api: Process, run_id: str) -> dict[str, Any]:
    response = httpx.get(f"{api.url}/runs/{run_id}", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def wait_until_ended(api: Process, run_ids: list[str], within: float) -> dict[str, dict[str, Any]]:
    """Every run once all of them ended (polling ``GET /runs/{id}`` for those still going)."""
    ended: dict[str, dict[str, Any]] = {}

    def all_ended() -> bool:
        with httpx.Client(base_url=api.url, timeout=10) as http:
            for run_id in run_ids:
                if run_id in ended:
                    continue
                run = http.get(f"/runs/{run_id}").json()
                if run["status"] not in ("succeeded", "failed", "cancelled"):
                    return False
                ended[run_id] = run
        return True

    try:
        wait_for(all_ended, within, f"{len(run_ids)} runs to end")
    except AssertionError:
        left = sorted(set(run_ids) - set(ended))
        raise AssertionError(f"{len(left)} runs never ended, e.g. {left[:3]}") from None
    return ended


def events_of(api: Process, run_id: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{api.url}/runs/{run_id}/events", headers={"Accept": "application/json"}, timeout=10
    )
    assert response.status_code == 200, response.text
    return response.json()


def assert_clean_history(api: Process, run_id: str, status: str) -> list[dict[str, Any]]:
    """The run's events are numbered 1..n without gaps or repeats, and end with its finish."""
    events = events_of(api, run_id)
    seqs = [event["id"] for event in events]
    assert seqs == list(range(1, len(events) + 1)), f"run {run_id}: event ids {seqs}"
    assert events[0]["type"] == "workflow.started"
    assert [e["type"] for e in events].count("workflow.finished") == 1
    assert events[-1]["type"] == "workflow.finished"
    assert events[-1]["status"] == status, events[-1]
    return events


def assert_completed_nodes_ran_once(
    executions: list[Execution],
    completed_before: set[tuple[str, str, int]],
    run_ids: list[str],
    dead_pid: int,
) -> None:
    """What DESIGN.md promises when a worker dies: a node whose completion was persisted never
    runs again; a node in flight on the dead worker may run once more (at-least-once)."""
    counts = Counter((e.run, e.node, e.iteration) for e in executions)
    first_pid: dict[tuple[str, str, int], int] = {}
    for e in executions:
        first_pid.setdefault((e.run, e.node, e.iteration), e.pid)
    for run_id in run_ids:
        for node in ("a", "c"):
            assert counts[(run_id, node, 0)] >= 1, f"run {run_id}: node {node} never ran"
    again = {key: n for key, n in counts.items() if n > 1}
    completed_again = {key: n for key, n in again.items() if key in completed_before}
    assert not completed_again, f"nodes that had completed before the kill ran again: {completed_again}"
    elsewhere = {key for key in again if first_pid[key] != dead_pid}
    assert not elsewhere, f"nodes ran twice though their worker did not die: {elsewhere}"


# --- the process-level tests --------------------------------------------------------------------


def test_runs_spread_over_workers_and_survive_one_killed(cluster: Cluster) -> None:
    victim, survivor = cluster.ensure_workers(2)
    api = cluster.apis[0]
    put_graph(api, chain("chain-kill"))
    run_ids = start_runs(api, "chain-kill", 40)

    def both_busy_and_victim_mid_run() -> set[tuple[str, str, int]] | None:
        executions = cluster.executions(run_ids)
        first_by = {e.run: e.pid for e in executions if e.node == "a"}
        finished = {e.run for e in executions if e.node == "c"}
        if survivor.pid not in first_by.values():
            return None
        completed = cluster.completed_nodes(run_ids)
        mid_run = [
            run
            for run, pid in first_by.items()
            if pid == victim.pid and (run, "a", 0) in completed and run not in finished
        ]
        return completed if len(mid_run) >= 2 else None

    completed_before = wait_for(both_busy_and_victim_mid_run, 30, "runs in flight on both workers")
    victim.kill()

    runs = wait_until_ended(api, run_ids, 60)
    assert {run["status"] for run in runs.values()} == {"succeeded"}, [
        (run["id"], run["status"], run["error"]) for run in runs.values() if run["status"] != "succeeded"
    ]
    executions = cluster.executions(run_ids)
    started_by = Counter(e.pid for e in executions if e.node == "a" and e.pid in (victim.pid, survivor.pid))
    assert started_by[victim.pid] >= 2, f"the load did not spread over both workers: {started_by}"
    assert started_by[survivor.pid] >= 2, f"the load did not spread over both workers: {started_by}"
    assert_completed_nodes_ran_once(executions, completed_before, run_ids, victim.pid)
    # The runs the victim was in the middle of were finished by the survivor, from where they were.
    resumed = {e.run for e in executions if e.node == "c" and e.pid != victim.pid} & {
        e.run for e in executions if e.node == "a" and e.pid == victim.pid
    }
    assert len(resumed) >= 2, "no run of the killed worker was resumed by another"
    for run_id in run_ids:
        events = assert_clean_history(api, run_id, "succeeded")
        if run_id in resumed and (run_id, "a", 0) in completed_before:
            # Resumed after `a` was persisted: `a` is not started again. (A run whose `a` was
            # still in flight on the victim starts it again: at-least-once, as DESIGN.md says.)
            started = [e["node"] for e in events if e["type"] == "node.started"]
            assert started.count("a") == 1, f"run {run_id}: {started}"


def test_a_fan_out_publishes_every_event_of_its_run_once_in_order(cluster: Cluster) -> None:
    cluster.ensure_workers(1)
    api = cluster.apis[0]
    branches = [f"b{i}" for i in range(30)]
    spec = {
        "name": "fan-publish",
        "concurrency": len(branches),
        "nodes": {
            "source": {"agent": "template", "template": "go"},
            **{b: {"agent": "wait", "seconds": 0.2} for b in branches},
            "join": {"agent": "template", "template": "done"},
        },
        "edges": [{"from": "source", "to": b} for b in branches]
        + [{"from": b, "to": "join"} for b in branches],
    }
    put_graph(api, spec)
    (run_id,) = start_runs(api, "fan-publish", 1)
    (run,) = wait_until_ended(api, [run_id], 30).values()
    assert run["status"] == "succeeded", run
    stored = assert_clean_history(api, run_id, "succeeded")
    # What the bus carried (the run's Redis stream), not what the store holds: the branches'
    # node.started, recorded while their agents ran, were published too, once each, in order.
    with redis.Redis.from_url(cluster.redis_url, decode_responses=True) as client:
        key = Keys(cluster.prefix).run_events(run_id)
        entries: list[tuple[str, dict[str, str]]] = client.xrange(key)  # pyright: ignore[reportAssignmentType]
    published = [decode(fields) for _, fields in entries]
    assert [e.seq for e in published] == [e["id"] for e in stored]
    started = [e.data["node"] for e in published if e.type == EventType.NODE_STARTED]
    assert sorted(started) == sorted(["source", *branches, "join"])


def test_cancel_through_another_api_stops_the_run_on_its_worker(cluster: Cluster) -> None:
    cluster.ensure_workers(1)
    first, second = cluster.apis
    put_graph(first, {"name": "nap", "nodes": {"nap": {"agent": "wait", "seconds": 60}}})
    (run_id,) = start_runs(first, "nap", 1)

    def napping() -> bool:
        return any(e["type"] == "node.started" for e in events_of(second, run_id))

    wait_for(napping, 20, "the run to start on a worker")
    began = time.monotonic()
    response = httpx.post(f"{second.url}/runs/{run_id}/cancel", timeout=10)
    assert response.status_code == 202, response.text
    wait_for(lambda: get_run(second, run_id)["status"] == "cancelled", 10, "the run to end cancelled")
    took = time.monotonic() - began
    assert took < 2.0, f"the cancel took {took:.2f} s to stop the run"
    run = get_run(first, run_id)
    assert run["status"] == "cancelled"
    assert [node["status"] for node in run["nodes"]] == ["cancelled"]
    assert_clean_history(first, run_id, "cancelled")


def test_sigterm_lets_running_runs_finish_before_the_worker_exits(cluster: Cluster) -> None:
    workers = cluster.ensure_workers(2)
    api = cluster.apis[0]
    put_graph(api, chain("chain-drain"))
    run_ids = start_runs(api, "chain-drain", 4)
    wait_for(
        lambda: {e.run for e in cluster.executions(run_ids) if e.node == "a"} == set(run_ids),
        20,
        "every run to be in flight",
    )
    for worker in workers:
        worker.popen.send_signal(signal.SIGTERM)
    codes = [worker.wait(15) for worker in workers]
    assert codes == [0, 0], [worker.log()[-2000:] for worker in workers]

    # The workers finished what they held before exiting: nothing is left for anyone to reclaim.
    for run_id in run_ids:
        assert get_run(api, run_id)["status"] == "succeeded"
        assert_clean_history(api, run_id, "succeeded")
    executions = cluster.executions(run_ids)
    ran_by = {run: {e.pid for e in executions if e.run == run} for run in run_ids}
    assert all(len(pids) == 1 for pids in ran_by.values()), ran_by
    assert all("taking no more runs" in worker.log() for worker in workers)


def test_runs_lost_with_redis_data_are_swept_back_and_complete(cluster: Cluster) -> None:
    victim, survivor = cluster.ensure_workers(2)
    api = cluster.apis[0]
    put_graph(api, chain("chain-loss"))
    run_ids = start_runs(api, "chain-loss", 24)  # more than the workers' 16 slots: some wait

    def victim_mid_run_and_some_waiting() -> set[tuple[str, str, int]] | None:
        executions = cluster.executions(run_ids)
        finished = {e.run for e in executions if e.node == "c"}
        completed = cluster.completed_nodes(run_ids)
        mid_run = [
            e.run
            for e in executions
            if e.node == "a"
            and e.pid == victim.pid
            and (e.run, "a", 0) in completed
            and e.run not in finished
        ]
        return completed if mid_run and cluster.queued_count(run_ids) > 0 else None

    completed_before = wait_for(victim_mid_run_and_some_waiting, 30, "a run in flight and runs waiting")
    # Redis restarts empty while a worker dies: every message, pending entry and heartbeat is gone.
    victim.kill()
    delete_keys(cluster.redis_url, Keys(cluster.prefix).pattern)

    runs = wait_until_ended(api, run_ids, 60)
    assert {run["status"] for run in runs.values()} == {"succeeded"}, [
        (run["id"], run["status"], run["error"]) for run in runs.values() if run["status"] != "succeeded"
    ]
    assert_completed_nodes_ran_once(cluster.executions(run_ids), completed_before, run_ids, victim.pid)
    for run_id in run_ids:
        assert_clean_history(api, run_id, "succeeded")
    assert "has no message in the run queue; enqueueing it again" in survivor.log()


# --- in-process tests ---------------------------------------------------------------------------


@pytest.fixture
async def inproc(database: str, anyio_backend: str) -> Any:
    """Settings of a distributed Braid on this module's database under a prefix of its own."""
    redis_url = require_redis()
    settings = Settings(
        database_url=database,
        redis_url=redis_url,
        redis_prefix=f"braid-dist-inproc-{uuid.uuid4().hex[:10]}",
        reclaim_idle_ms=100,
        prompts_dir=ROOT / "prompts",
        examples_dir=None,
        mock_delay=0,
    )
    try:
        yield settings
    finally:
        delete_keys(redis_url, Keys(settings.redis_prefix).pattern)


@pytest.mark.anyio
async def test_a_run_delivered_too_often_is_dead_lettered_and_fails(inproc: Settings) -> None:
    from server.braid import open_braid

    assert inproc.redis_url is not None
    spec = {"name": "doomed", "nodes": {"t": {"agent": "template", "template": "hi"}}}
    async with open_braid(inproc, workers=False) as braid:
        await braid.store.put_graph("doomed", spec, None, 1)
        run, _ = await braid.runs.start("doomed", {})
        # A worker that keeps dying: it takes the run and never finishes it, MAX_DELIVERIES times.
        ghost = RedisQueue(
            inproc.redis_url, prefix=inproc.redis_prefix, consumer="ghost", idle_ms=0, block_ms=100
        )
        try:
            for expected in range(1, MAX_DELIVERIES + 1):
                with anyio.fail_after(10):
                    delivery = await ghost.take()
                assert (delivery.run_id, delivery.deliveries) == (run.id, expected)
        finally:
            await ghost.close()

    async with open_braid(inproc, workers=True) as braid:
        failed = await braid.runs.wait(run.id, timeout=20)
        assert failed.status == "failed"
        assert failed.error is not None
        assert f"delivered {MAX_DELIVERIES + 1} times" in failed.error
        events = await braid.store.events(run.id)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert events[-1].type == "workflow.finished"
        assert events[-1].data["status"] == "failed"
        keys = Keys(inproc.redis_prefix)
        assert isinstance(braid.queue, RedisQueue)
        dead = await braid.queue.redis.xrange(keys.dead_runs) or []
        assert len(dead) == 1
        fields = {str(k): str(v) for k, v in (dead[0][1] or {}).items()}
        assert fields["run_id"] == run.id
        assert "giving up" in fields["reason"]
        assert await braid.queue.redis.xlen(keys.runs) == 0


@pytest.mark.anyio
async def test_health_is_503_when_redis_is_unreachable(inproc: Settings) -> None:
    import dataclasses

    from server.api.app import create_app

    closed = free_port()  # nothing listens there
    settings = dataclasses.replace(inproc, redis_url=f"redis://127.0.0.1:{closed}/0")
    async with AsyncTestClient(app=create_app(settings, workers=False)) as client:
        with anyio.fail_after(10):
            response = await client.get("/health")
    assert response.status_code == 503
    body = response.json()
    assert body["queue"] == "down"
    assert body["database"] == "ok"
    assert body["mode"] == "distributed"

    async with AsyncTestClient(app=create_app(inproc, workers=False)) as client:
        response = await client.get("/health")
    assert response.status_code == 200, response.text
    assert response.json()["queue"] == "ok"


@pytest.mark.anyio
async def test_with_redis_unreachable_a_run_is_still_accepted_and_other_calls_are_503(
    inproc: Settings, tmp_path: Path
) -> None:
    """A run stored while Redis is away is accepted (202; the workers' sweep queues it when Redis
    is back), with or without ?wait; what cannot be done without Redis (a cancel) is a 503."""
    import dataclasses

    from server.api.app import create_app

    spec = {"name": "offline", "nodes": {"t": {"agent": "template", "template": "hi"}}}
    closed = free_port()
    # A database of its own: the runs it leaves queued are not for the other tests' sweeps.
    settings = dataclasses.replace(
        inproc, redis_url=f"redis://127.0.0.1:{closed}/0", database_url=f"sqlite+aiosqlite:///{tmp_path}/b.db"
    )
    async with AsyncTestClient(app=create_app(settings, workers=False)) as client:
        with anyio.fail_after(30):
            assert (await client.put("/graphs/offline", json=spec)).status_code in (200, 201)
            started = await client.post("/graphs/offline/runs", json={"input": {}})
            assert started.status_code == 202, started.text
            run_id = started.json()["id"]
            assert (await client.get(f"/runs/{run_id}")).json()["status"] == "queued"

            cancel = await client.post(f"/runs/{run_id}/cancel")
            assert cancel.status_code == 503, cancel.text
            assert "Redis is unavailable" in cancel.json()["detail"]
            # Waiting cannot follow the run's events: the run is answered as accepted, at once.
            waited = await client.post("/graphs/offline/runs?wait=true", json={"input": {}})
            assert waited.status_code == 202, waited.text
            assert waited.json()["status"] == "queued"
            assert (await client.get(f"/runs/{run_id}")).json()["status"] == "queued"


@pytest.mark.anyio
async def test_a_finished_run_replays_over_sse_from_the_database_while_redis_is_away(
    inproc: Settings, tmp_path: Path
) -> None:
    import dataclasses

    from server.api.app import create_app
    from server.braid import open_braid

    spec = {"name": "told", "nodes": {"t": {"agent": "template", "template": "hi"}}}
    settings = dataclasses.replace(inproc, database_url=f"sqlite+aiosqlite:///{tmp_path}/told.db")
    async with open_braid(settings, workers=True) as braid:
        await braid.store.put_graph("told", spec, None, 1)
        run, _ = await braid.runs.start("told", {})
        assert (await braid.runs.wait(run.id, 10)).status == "succeeded"

    away = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with AsyncTestClient(app=create_app(away, workers=False)) as client:
        with anyio.fail_after(20):
            response = await client.get(f"/runs/{run.id}/events", headers={"Accept": "text/event-stream"})
    assert response.status_code == 200
    ids = [int(line[3:]) for line in response.text.splitlines() if line.startswith("id:")]
    assert ids == [1, 2, 3, 4]
    assert "event: workflow.finished" in response.text


@pytest.mark.anyio
async def test_the_sweep_enqueues_only_runs_that_lost_their_message(inproc: Settings) -> None:
    from server.braid import open_braid
    from server.sweep import Sweeper

    spec = {"name": "swept", "nodes": {"t": {"agent": "template", "template": "hi"}}}
    async with open_braid(inproc, workers=False) as braid:
        assert isinstance(braid.queue, RedisQueue)
        await braid.store.put_graph("swept", spec, None, 1)
        lost, held, kept = [(await braid.runs.start("swept", {}))[0].id for _ in range(3)]
        keys = Keys(inproc.redis_prefix)
        # Redis loses the messages of two runs; a live worker still executes one of them.
        entries = await braid.queue.redis.xrange(keys.runs) or []
        doomed = [
            str(entry_id) for entry_id, fields in entries if (fields or {}).get("run_id") in (lost, held)
        ]
        await braid.queue.redis.xdel(keys.runs, *doomed)
        await braid.queue._mark_alive(held)

        sweeper = Sweeper(braid.store, braid.queue, stale_after=0, confirm_after=0)
        assert await sweeper.sweep() == [lost]
        assert await braid.queue.queued_run_ids() == {lost, kept}
        assert await sweeper.sweep() == []  # it is in the queue again: once is enough


@pytest.mark.anyio
async def test_a_run_left_unfinished_after_the_grace_is_resumed_by_another_worker(inproc: Settings) -> None:
    from server.braid import open_braid

    spec = {
        "name": "drowsy",
        "nodes": {"first": {"agent": "template", "template": "hi"}, "nap": {"agent": "wait", "seconds": 1}},
        "edges": [{"from": "first", "to": "nap"}],
    }
    keys = Keys(inproc.redis_prefix)
    async with open_braid(inproc, workers=True) as braid:
        assert braid.runner is not None
        assert isinstance(braid.queue, RedisQueue)
        await braid.store.put_graph("drowsy", spec, None, 2)
        async with braid.bus.subscribe() as feed:
            run, _ = await braid.runs.start("drowsy", {})
            with anyio.fail_after(10):
                while (await feed.receive()).data.get("node") != "nap":
                    pass
        assert not await braid.runner.drain(0.1)  # the nap outlasts the grace
        # The worker stops here: the run stays unfinished and its message pending, unacknowledged.
    async with open_braid(inproc, workers=False) as braid:
        assert isinstance(braid.queue, RedisQueue)
        assert (await braid.store.get_run(run.id)).status == "running"
        assert await braid.queue.queued_run_ids() == {run.id}
        assert (await braid.queue.redis.xpending(keys.runs, "workers"))["pending"] == 1

    async with open_braid(inproc, workers=True) as braid:
        resumed = await braid.runs.wait(run.id, timeout=20)
        assert resumed.status == "succeeded"
        events = await braid.store.events(run.id)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        started = [e.data["node"] for e in events if e.type == "node.started"]
        assert started == ["first", "nap", "nap"]  # the completed node did not run again


@contextmanager
def private_redis(folder: Path) -> Generator[tuple[str, Callable[[], None]]]:
    """A Redis of this test's own (the shared one must not restart under other tests): its URL
    and a function that restarts it empty, as a Redis without persistence comes back."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    holder: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        log_file = (folder / "redis.log").open("ab")
        holder.append(subprocess.Popen(command, cwd=folder, stdout=log_file, stderr=subprocess.STDOUT))
        log_file.close()

        def answers() -> bool:
            try:
                with redis.Redis(port=port, socket_timeout=1) as client:
                    return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(answers, 10, "the private Redis to answer")

    def restart() -> None:
        holder[-1].kill()
        holder[-1].wait()
        start()

    start()
    try:
        yield f"redis://127.0.0.1:{port}/0", restart
    finally:
        holder[-1].kill()
        holder[-1].wait()


@pytest.mark.anyio
async def test_runs_survive_a_redis_restart_that_loses_everything(
    inproc: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import dataclasses

    from server.braid import open_braid
    from server.sweep import Sweeper

    spec = {
        "name": "steady",
        "nodes": {
            "first": {"agent": "template", "template": "hi"},
            "nap": {"agent": "wait", "seconds": 1},
            "last": {"agent": "template", "template": "bye"},
        },
        "edges": [{"from": "first", "to": "nap"}, {"from": "nap", "to": "last"}],
    }
    with private_redis(tmp_path) as (url, restart_redis):
        settings = dataclasses.replace(inproc, redis_url=url, reclaim_idle_ms=1000, worker_concurrency=4)
        async with open_braid(settings, workers=True) as braid, anyio.create_task_group() as tg:
            assert isinstance(braid.queue, RedisQueue)
            await tg.start(Sweeper.paced_by(braid.store, braid.queue).serve)
            await braid.store.put_graph("steady", spec, None, 3)
            async with braid.bus.subscribe() as feed:
                run_ids = [(await braid.runs.start("steady", {}))[0].id for _ in range(8)]  # 4 wait
                with anyio.fail_after(10):
                    while (await feed.receive()).data.get("node") != "nap":
                        pass
            await anyio.to_thread.run_sync(restart_redis)

            with anyio.fail_after(45):
                while True:
                    runs = [await braid.store.get_run(run_id) for run_id in run_ids]
                    if all(run.status.ended for run in runs):
                        break
                    await anyio.sleep(0.1)  # poll interval; fail_after bounds the wait
            assert [run.status for run in runs] == ["succeeded"] * len(run_ids), [r.error for r in runs]
            for run_id in run_ids:
                events = await braid.store.events(run_id)
                assert [e.seq for e in events] == list(range(1, len(events) + 1))
                assert [e.type for e in events].count(EventType.WORKFLOW_FINISHED) == 1
            assert await braid.queue.ping()
            tg.cancel_scope.cancel()
    swept = [r.getMessage() for r in caplog.records if "enqueueing it again" in r.getMessage()]
    assert swept, "the runs that waited in the lost stream were not swept back"
