"""The store's contract, run against SQLite (a file) and a real Postgres (a fresh database)."""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from sqlalchemy import create_engine
from sqlalchemy import event as sa_event

from server.engine.records import NodeExecution, RunUpdate
from server.errors import Conflict, NotFound, SetupError
from server.events import Event
from server.status import EventType, NodeStatus, RunStatus
from server.store import sql as sql_module
from server.store.models import EVENTS, NODES, RUNS, SCHEMA_VERSION, UTCDateTime
from server.store.sql import SqlStore, _dumps, _SqliteBatches  # pyright: ignore[reportPrivateUsage]
from tests.services import require_postgres

pytestmark = pytest.mark.anyio

SPEC: dict[str, Any] = {"name": "brief", "nodes": {"a": {"agent": "template", "value": "1"}}}
T0 = datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _plain(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def _admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(_plain(url))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def _admin_now(url: str, *statements: str) -> None:
    """``_admin`` from sync code that may run inside the test's event loop (session fixtures)."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(anyio.run, _admin, url, *statements).result()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh database for this test session, dropped at the end (other suites share the server)."""
    url = require_postgres()
    server, _ = url.rsplit("/", 1)
    name = f"braid_test_{secrets.token_hex(6)}"
    _admin_now(f"{server}/postgres", f'CREATE DATABASE "{name}"')
    try:
        yield f"{server}/{name}"
    finally:
        _admin_now(f"{server}/postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'braid.db'}"
    url: str = request.getfixturevalue("postgres_database")
    await _admin(url, "DROP SCHEMA public CASCADE", "CREATE SCHEMA public")
    return url


Opener = Callable[..., Awaitable[SqlStore]]


@pytest.fixture
async def open_store(database_url: str) -> AsyncIterator[Opener]:
    """Opens (starts) stores on the test's database, and closes them all at the end."""
    stores: list[SqlStore] = []

    async def open_store(**options: Any) -> SqlStore:
        store = SqlStore(database_url, **options)
        stores.append(store)
        await store.start()
        return store

    try:
        yield open_store
    finally:
        for store in stores:
            await store.close()


@pytest.fixture
async def store(open_store: Opener) -> SqlStore:
    return await open_store()


def node_event(run_id: str, seq: int, type: EventType, node: str, graph: str = "brief", **data: Any) -> Event:
    return Event(run_id=run_id, seq=seq, type=type, graph=graph, data={"node": node, **data}, at=T0)


# --- graphs ---------------------------------------------------------------------------------------


async def test_create_graph_then_conflict(store: SqlStore) -> None:
    record = await store.create_graph("brief", SPEC, "a brief", 1)
    assert (record.name, record.version, record.spec, record.description, record.nodes) == (
        "brief",
        1,
        SPEC,
        "a brief",
        1,
    )
    assert record.created_at.tzinfo is not None
    with pytest.raises(Conflict, match="brief"):
        await store.create_graph("brief", SPEC, None, 1)


async def test_put_graph_stores_versions(store: SqlStore) -> None:
    first, created = await store.put_graph("brief", SPEC, "v1", 1)
    assert (first.version, created) == (1, True)
    spec2 = {**SPEC, "description": "second"}
    second, created = await store.put_graph("brief", spec2, "v2", 2)
    assert (second.version, created) == (2, False)

    latest = await store.get_graph("brief")
    assert (latest.version, latest.spec, latest.description, latest.nodes) == (2, spec2, "v2", 2)
    assert (await store.get_graph("brief", 1)).spec == SPEC
    assert [g.version for g in await store.graph_versions("brief")] == [2, 1]

    with pytest.raises(NotFound, match=r"'brief' has no version 7"):
        await store.get_graph("brief", 7)
    with pytest.raises(NotFound, match="'nope'"):
        await store.get_graph("nope")
    with pytest.raises(NotFound, match="'nope'"):
        await store.graph_versions("nope")


async def test_a_version_stored_by_another_process_is_the_latest_at_once(open_store: Opener) -> None:
    """Two API processes on one database: a graph put through one is run at its new version
    through the other straight away (graph records are cached, which version is latest is not)."""
    one, other = await open_store(), await open_store()
    await one.put_graph("brief", SPEC, "v1", 1)
    assert (await other.get_graph("brief")).version == 1  # now in other's cache
    spec2 = {**SPEC, "description": "second"}
    await one.put_graph("brief", spec2, "v2", 1)
    latest = await other.get_graph("brief")
    assert (latest.version, latest.spec) == (2, spec2)
    await one.delete_graph("brief")
    with pytest.raises(NotFound, match="'brief'"):
        await other.get_graph("brief")


async def test_concurrent_put_graph_never_reuses_a_version(store: SqlStore) -> None:
    versions: list[int] = []

    async def put(i: int) -> None:
        record, _ = await store.put_graph("brief", {**SPEC, "i": i}, None, 1)
        versions.append(record.version)

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(put, i)
    assert sorted(versions) == list(range(1, 9))
    assert len(await store.graph_versions("brief")) == 8


async def test_list_graphs_with_last_run_and_delete_keeps_runs(store: SqlStore) -> None:
    await store.put_graph("zeta", SPEC, "z", 1)
    await store.put_graph("alpha", SPEC, "a1", 1)
    await store.put_graph("alpha", SPEC, "a2", 3)
    await store.create_run("alpha", 1, {"n": 1})
    newest, _ = await store.create_run("alpha", 2, {"n": 2})

    summaries = await store.list_graphs()
    assert [(s.name, s.version, s.description, s.nodes) for s in summaries] == [
        ("alpha", 2, "a2", 3),
        ("zeta", 1, "z", 1),
    ]
    assert summaries[0].last_run is not None
    assert summaries[0].last_run.id == newest.id
    assert summaries[1].last_run is None

    await store.delete_graph("alpha")
    assert [s.name for s in await store.list_graphs()] == ["zeta"]
    with pytest.raises(NotFound):
        await store.get_graph("alpha")
    assert (await store.get_run(newest.id)).graph == "alpha"
    with pytest.raises(NotFound, match="'alpha'"):
        await store.delete_graph("alpha")


# --- runs -----------------------------------------------------------------------------------------


async def test_create_run_is_idempotent_per_graph(store: SqlStore) -> None:
    run, created = await store.create_run("brief", 1, {"topic": "x"}, idempotency_key="k1")
    assert created
    assert (run.status, run.input, run.idempotency_key, run.last_seq) == (
        RunStatus.QUEUED,
        {"topic": "x"},
        "k1",
        0,
    )
    assert run.created_at.tzinfo is not None

    again, created = await store.create_run("brief", 1, {"topic": "other"}, idempotency_key="k1")
    assert (again.id, again.input, created) == (run.id, {"topic": "x"}, False)

    elsewhere, created = await store.create_run("other", 1, {}, idempotency_key="k1")
    assert created
    assert elsewhere.id != run.id

    no_key_1, _ = await store.create_run("brief", 1, None)
    no_key_2, _ = await store.create_run("brief", 1, None)
    assert no_key_1.id != no_key_2.id
    assert (await store.get_run(run.id)).input == {"topic": "x"}
    with pytest.raises(NotFound, match="'missing'"):
        await store.get_run("missing")


async def test_concurrent_create_run_with_one_key_makes_one_run(store: SqlStore) -> None:
    results: list[tuple[str, bool]] = []

    async def create() -> None:
        run, created = await store.create_run("brief", 1, {}, idempotency_key="same")
        results.append((run.id, created))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(create)
    assert len({run_id for run_id, _ in results}) == 1
    assert [created for _, created in results].count(True) == 1
    runs, _ = await store.list_runs()
    assert len(runs) == 1


async def test_a_burst_of_new_runs_is_stored_in_few_statements_and_a_taken_key_fails_alone(
    store: SqlStore,
) -> None:
    taken, _ = await store.create_run("brief", 1, {"first": True}, idempotency_key="taken")
    inserts = 0

    def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        nonlocal inserts
        inserts += statement.lstrip().upper().startswith("INSERT INTO RUNS")

    engines = {store._writer or store._autocommit.sync_engine, store._engine.sync_engine}
    for engine in engines:
        sa_event.listen(engine, "before_cursor_execute", count)
    results: dict[str, list[tuple[str, bool]]] = {}

    async def create(key: str | None, i: int) -> None:
        run, created = await store.create_run("brief", 1, {"i": i}, idempotency_key=key)
        results.setdefault(key or f"plain-{i}", []).append((run.id, created))

    async with anyio.create_task_group() as tg:
        for i in range(30):
            tg.start_soon(create, None, i)
    assert inserts < 5, f"{inserts} INSERT statements for a burst of 30 new runs: not batched"
    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(create, None, 100 + i)
        tg.start_soon(create, "taken", 30)
        tg.start_soon(create, "new", 31)
        tg.start_soon(create, "new", 32)

    assert results["taken"] == [(taken.id, False)]
    assert sorted(created for _, created in results["new"]) == [False, True]
    assert len({run_id for run_id, _ in results["new"]}) == 1
    plain = [results[f"plain-{i}"][0] for i in (*range(30), *range(100, 120))]
    assert all(created for _, created in plain)
    assert len({run_id for run_id, _ in plain}) == 50
    runs, _ = await store.list_runs(limit=100)
    assert len(runs) == 1 + 50 + 1
    inputs = {r.id: r.input for r in runs}
    assert inputs[plain[7][0]] == {"i": 7}
    assert inputs[plain[-1][0]] == {"i": 119}


async def test_list_runs_pages_newest_first_with_filters(store: SqlStore) -> None:
    ids = [(await store.create_run("a" if i % 2 else "b", 1, {"i": i}))[0].id for i in range(7)]
    assert ids == sorted(ids), "run ids are time-ordered"

    page, cursor = await store.list_runs(limit=3)
    assert [r.id for r in page] == ids[::-1][:3]
    assert cursor is not None
    page, cursor = await store.list_runs(limit=3, before=cursor)
    assert [r.id for r in page] == ids[::-1][3:6]
    page, cursor = await store.list_runs(limit=3, before=cursor)
    assert ([r.id for r in page], cursor) == ([ids[0]], None)

    only_a, cursor = await store.list_runs(graph="a")
    assert ([r.id for r in only_a], cursor) == ([ids[5], ids[3], ids[1]], None)

    await store.record(
        Event(run_id=ids[2], seq=1, type=EventType.WORKFLOW_STARTED, graph="b"),
        RunUpdate(status=RunStatus.RUNNING, at=T0),
    )
    running, _ = await store.list_runs(status=RunStatus.RUNNING)
    assert [r.id for r in running] == [ids[2]]
    assert await store.list_runs(graph="a", status=RunStatus.RUNNING) == ([], None)
    queued = await store.runs_with_status(RunStatus.QUEUED)
    assert [r.id for r in queued] == [i for i in ids if i != ids[2]]
    both = await store.runs_with_status(RunStatus.QUEUED, RunStatus.RUNNING)
    assert [r.id for r in both] == ids


# --- recording ------------------------------------------------------------------------------------


async def record_a_run(store: SqlStore, run_id: str) -> None:
    """A run: start, node a (map of 2 items, a retry), node b skipped, then succeed."""
    t = [T0 + timedelta(seconds=i) for i in range(10)]
    started = Event(
        run_id=run_id, seq=1, type=EventType.WORKFLOW_STARTED, graph="brief", data={"version": 1}, at=t[0]
    )
    await store.record(started, RunUpdate(status=RunStatus.RUNNING, at=t[0]))
    whole = NodeExecution(node="a", status=NodeStatus.RUNNING, attempts=1, started_at=t[1])
    await store.record(node_event(run_id, 2, EventType.NODE_STARTED, "a", attempt=1, iteration=0), whole)
    item0 = NodeExecution(node="a", index=0, status=NodeStatus.RUNNING, attempts=1, started_at=t[2])
    await store.record(node_event(run_id, 3, EventType.NODE_STARTED, "a", attempt=1, index=0), item0)
    await store.record(node_event(run_id, 4, EventType.NODE_DELTA, "a", delta="hel"))
    item0.status, item0.attempts, item0.error = NodeStatus.RETRYING, 2, "timeout"
    await store.record(node_event(run_id, 5, EventType.NODE_RETRYING, "a", attempt=2, error="timeout"), item0)
    item0.status, item0.output, item0.error, item0.finished_at = NodeStatus.SUCCEEDED, "x", None, t[4]
    item0.usage = {"total_tokens": 3}
    await store.record(node_event(run_id, 6, EventType.NODE_COMPLETED, "a", output="x"), item0)
    pending = NodeExecution(node="c", status=NodeStatus.PENDING)
    await store.record(node_event(run_id, 7, EventType.NODE_STARTED, "c"), pending)
    whole.status, whole.output, whole.finished_at = NodeStatus.SUCCEEDED, ["x"], t[5]
    whole.usage = {"total_tokens": 3}
    await store.record(node_event(run_id, 8, EventType.NODE_COMPLETED, "a", output=["x"]), whole)
    skipped = NodeExecution(node="b", status=NodeStatus.SKIPPED, started_at=t[6], finished_at=t[6])
    await store.record(node_event(run_id, 9, EventType.NODE_SKIPPED, "b"), skipped)


async def test_record_keeps_run_and_node_state(store: SqlStore) -> None:
    run, _ = await store.create_run("brief", 1, {"topic": "x"})
    await record_a_run(store, run.id)

    mid = await store.get_run(run.id)
    assert (mid.status, mid.started_at, mid.finished_at, mid.last_seq) == (RunStatus.RUNNING, T0, None, 9)

    state = await store.run_state(run.id)
    assert state.last_seq == 9
    assert state.started
    assert [(e.node, e.index, e.status) for e in state.executions] == [
        ("a", None, NodeStatus.SUCCEEDED),
        ("a", 0, NodeStatus.SUCCEEDED),
        ("b", None, NodeStatus.SKIPPED),
    ]

    end = T0 + timedelta(seconds=9)
    finished = Event(run_id=run.id, seq=10, type=EventType.WORKFLOW_FINISHED, graph="brief", at=end)
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    await store.record(
        finished, RunUpdate(status=RunStatus.SUCCEEDED, at=end, output={"text": "x"}, usage=usage)
    )
    done = await store.get_run(run.id)
    assert (done.status, done.output, done.error, done.usage, done.last_seq) == (
        RunStatus.SUCCEEDED,
        {"text": "x"},
        None,
        usage,
        10,
    )
    assert (done.started_at, done.finished_at, done.duration_ms) == (T0, end, 9000)

    nodes = await store.node_executions(run.id)
    assert [(n.node, n.index, n.status, n.attempts) for n in nodes] == [
        ("a", None, NodeStatus.SUCCEEDED, 1),
        ("a", 0, NodeStatus.SUCCEEDED, 2),
        ("b", None, NodeStatus.SKIPPED, 0),
        ("c", None, NodeStatus.PENDING, 0),
    ]
    item = nodes[1]
    assert (item.output, item.error, item.usage, item.duration_ms) == ("x", None, {"total_tokens": 3}, 2000)
    assert nodes[0].output == ["x"]


async def test_run_state_of_a_new_run_and_a_missing_one(store: SqlStore) -> None:
    run, _ = await store.create_run("brief", 1, None)
    state = await store.run_state(run.id)
    assert (state.last_seq, state.started, state.executions) == (0, False, [])
    with pytest.raises(NotFound):
        await store.run_state("missing")


async def test_failed_run_keeps_error_and_cancelled_queued_run_has_no_start(store: SqlStore) -> None:
    run, _ = await store.create_run("brief", 1, None)
    await store.record(
        Event(run_id=run.id, seq=1, type=EventType.WORKFLOW_FINISHED, graph="brief", at=T0),
        RunUpdate(status=RunStatus.CANCELLED, at=T0, error="cancelled by request"),
    )
    got = await store.get_run(run.id)
    assert (got.status, got.error, got.started_at, got.finished_at, got.duration_ms) == (
        RunStatus.CANCELLED,
        "cancelled by request",
        None,
        T0,
        None,
    )


async def test_events_after_returns_exactly_the_rest(store: SqlStore) -> None:
    run, _ = await store.create_run("brief", 1, None)
    await record_a_run(store, run.id)
    events = await store.events(run.id)
    assert [e.seq for e in events] == list(range(1, 10))
    assert events[3].type is EventType.NODE_DELTA
    assert events[3].data == {"node": "a", "delta": "hel"}
    assert events[0].data == {"version": 1}
    assert all(e.gid is not None for e in events)
    assert [e.seq for e in await store.events(run.id, after=6)] == [7, 8, 9]
    assert [e.seq for e in await store.events(run.id, after=2, limit=2)] == [3, 4]
    assert await store.events(run.id, after=9) == []


async def test_feed_orders_all_runs_by_gid_and_filters(store: SqlStore) -> None:
    one, _ = await store.create_run("brief", 1, None)
    two, _ = await store.create_run("other", 1, None)
    recorded: list[Event] = []
    for seq in (1, 2, 3):
        for run, graph in ((one, "brief"), (two, "other")):
            kind = EventType.NODE_DELTA if seq == 2 else EventType.NODE_STARTED
            event = node_event(run.id, seq, kind, "a", graph=graph)
            await store.record(event)
            recorded.append(event)
    assert all(e.gid is not None for e in recorded)
    gids = [e.gid or 0 for e in recorded]
    assert gids == sorted(gids)

    lifecycle = [e for e in recorded if e.type is not EventType.NODE_DELTA]
    feed = await store.feed()
    assert [(e.run_id, e.seq, e.gid) for e in feed] == [(e.run_id, e.seq, e.gid) for e in lifecycle]
    everything = await store.feed(deltas=True)
    assert [e.gid for e in everything] == gids
    assert [e.gid for e in await store.feed(after=gids[2], deltas=True)] == gids[3:]
    assert [e.gid for e in await store.feed(limit=2, deltas=True)] == gids[:2]
    assert [(e.run_id, e.seq) for e in await store.feed(graph="other")] == [(two.id, 1), (two.id, 3)]


@pytest.mark.parametrize("batch_size", [512, 3])
async def test_concurrent_records_are_group_committed(open_store: Opener, batch_size: int) -> None:
    store = await open_store(batch_size=batch_size)
    runs = [(await store.create_run("brief", 1, None))[0].id for _ in range(20)]
    commits = 0

    def count(_conn: object) -> None:
        nonlocal commits
        commits += 1

    sa_event.listen(store._engine.sync_engine, "commit", count)

    async def one_run(run_id: str) -> None:
        for seq in range(1, 11):
            await store.record(
                node_event(run_id, seq, EventType.NODE_COMPLETED, f"n{seq}"),
                NodeExecution(node=f"n{seq}", status=NodeStatus.SUCCEEDED, output=seq),
            )

    async with anyio.create_task_group() as tg:
        for run_id in runs:
            tg.start_soon(one_run, run_id)

    if batch_size > 200:
        assert commits < 200 / 2, f"{commits} transactions for 200 events: not batched"
    for run_id in runs:
        events = await store.events(run_id)
        assert [e.seq for e in events] == list(range(1, 11))
        gids = [e.gid or 0 for e in events]
        assert gids == sorted(gids)
        assert (await store.get_run(run_id)).last_seq == 10
        assert [n.output for n in await store.node_executions(run_id)] == list(range(1, 11))
    assert len(await store.feed(limit=1000)) == 200


async def test_point_reads_made_at_once_each_get_their_own_answer(store: SqlStore) -> None:
    """Runs by id and graphs' latest versions read at once (on Postgres: in one statement for
    all the runs and one for all the graphs); a missing one fails only its own caller."""
    await store.create_graph("brief", SPEC, None, 1)
    await store.put_graph("brief", SPEC, "second", 1)
    await store.create_graph("other", {**SPEC, "name": "other"}, None, 1)
    runs = [(await store.create_run("brief", 1, {"n": i}))[0] for i in range(5)]
    for name in ("brief", "other"):
        await store.get_graph(name)  # graph records cached: only the lookups below read
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    engine = store._autocommit.sync_engine  # pyright: ignore[reportPrivateUsage]
    sa_event.listen(engine, "before_cursor_execute", seen)
    found: dict[str, Any] = {}

    async def read(key: str, read: Callable[[], Awaitable[Any]]) -> None:
        try:
            found[key] = await read()
        except NotFound:
            found[key] = "not found"

    try:
        async with anyio.create_task_group() as tg:
            for run in runs:
                tg.start_soon(read, run.id, lambda i=run.id: store.get_run(i))
            tg.start_soon(read, "missing-run", lambda: store.get_run("missing"))
            for name in ("brief", "other", "missing"):
                tg.start_soon(read, f"graph {name}", lambda n=name: store.get_graph(n))
    finally:
        sa_event.remove(engine, "before_cursor_execute", seen)

    assert [(found[r.id].id, found[r.id].input) for r in runs] == [
        (r.id, {"n": i}) for i, r in enumerate(runs)
    ]
    assert found["missing-run"] == "not found"
    assert (found["graph brief"].version, found["graph brief"].description) == (2, "second")
    assert found["graph other"].version == 1
    assert found["graph missing"] == "not found"
    if not store.url.startswith("sqlite"):
        assert len(statements) == 2, statements


async def test_a_graph_read_by_many_at_once_is_read_once(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of runs of one graph (its record no longer cached) reads the record once; a read
    after it has ended reads again."""
    await store.create_graph("brief", SPEC, "first", 1)
    monkeypatch.setattr("server.store.sql.GRAPH_TTL_SECONDS", 0.0)  # nothing stays cached
    reads = 0
    read_graph = sql_module._read_graph  # pyright: ignore[reportPrivateUsage]

    def counted(conn: Any, name: str, version: int | None) -> Any:
        nonlocal reads
        reads += 1
        return read_graph(conn, name, version)

    monkeypatch.setattr("server.store.sql._read_graph", counted)
    got: list[Any] = []

    async def get() -> None:
        got.append(await store.get_graph("brief", 1))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(get)
    assert reads == 1
    assert [(g.name, g.version, g.description) for g in got] == [("brief", 1, "first")] * 20
    with pytest.raises(NotFound):
        await store.get_graph("brief", 2)
    assert (await store.get_graph("brief", 1)).description == "first"
    assert reads == 3


async def test_a_graph_read_whose_reader_is_cancelled_is_read_again_by_those_waiting(
    sqlite_store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = sqlite_store
    await store.create_graph("brief", SPEC, "first", 1)
    monkeypatch.setattr("server.store.sql.GRAPH_TTL_SECONDS", 0.0)
    read = store._read  # pyright: ignore[reportPrivateUsage]
    entered = anyio.Event()
    reads = 0

    async def stuck_once(read_one: Any) -> Any:
        nonlocal reads
        reads += 1
        if reads == 1:  # the first read never ends: its caller is cancelled
            entered.set()
            await anyio.sleep_forever()
        return await read(read_one)

    monkeypatch.setattr(store, "_read", stuck_once)
    waited: list[Any] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            reader = anyio.CancelScope()

            async def first() -> None:
                with reader:
                    await store.get_graph("brief", 1)

            async def second() -> None:
                waited.append(await store.get_graph("brief", 1))

            tg.start_soon(first)
            await entered.wait()
            tg.start_soon(second)  # finds the first read in flight and waits for it
            await anyio.lowlevel.checkpoint()
            reader.cancel()
    assert [(g.name, g.description) for g in waited] == [("brief", "first")]
    assert reads == 2


async def test_a_failing_event_fails_only_its_caller(store: SqlStore) -> None:
    run, _ = await store.create_run("brief", 1, None)
    outcomes: dict[str, str] = {}

    async def record(name: str, event: Event) -> None:
        try:
            await store.record(event)
            outcomes[name] = "ok"
        except Exception:
            outcomes[name] = "error"

    async with anyio.create_task_group() as tg:
        tg.start_soon(record, "good-1", node_event(run.id, 1, EventType.NODE_STARTED, "a"))
        tg.start_soon(record, "no-such-run", node_event("missing", 1, EventType.NODE_STARTED, "a"))
        tg.start_soon(record, "good-2", node_event(run.id, 2, EventType.NODE_STARTED, "a"))
        tg.start_soon(record, "duplicate", node_event(run.id, 2, EventType.NODE_STARTED, "a"))

    assert outcomes == {"good-1": "ok", "no-such-run": "error", "good-2": "ok", "duplicate": "error"}
    await store.record(node_event(run.id, 3, EventType.NODE_STARTED, "a"))
    assert [e.seq for e in await store.events(run.id)] == [1, 2, 3]


async def test_record_later_takes_its_place_at_once_and_persists_when_finished(store: SqlStore) -> None:
    run, _ = await store.create_run("brief", 1, None)
    first = store.record_later(node_event(run.id, 1, EventType.NODE_STARTED, "a"))
    # Recorded after it, committed after it: the later event cannot land first (no gap).
    await store.record(node_event(run.id, 2, EventType.NODE_COMPLETED, "a", output="x"))
    assert [e.seq for e in await store.events(run.id)] == [1, 2]
    with anyio.fail_after(5):
        await store.finish([first])  # written already: returns at once
    later = [store.record_later(node_event(run.id, seq, EventType.NODE_STARTED, "b")) for seq in (3, 4, 5)]
    with anyio.fail_after(5):
        await store.finish(later)  # nothing after them: finishing writes them
    assert [e.seq for e in await store.events(run.id)] == [1, 2, 3, 4, 5]
    assert (await store.get_run(run.id)).last_seq == 5


async def test_record_later_of_a_taken_number_fails_its_finish(store: SqlStore) -> None:
    run, _ = await store.create_run("brief", 1, None)
    await store.record(node_event(run.id, 1, EventType.NODE_STARTED, "a"))
    taken = store.record_later(node_event(run.id, 1, EventType.NODE_STARTED, "b"))
    after = store.record_later(node_event(run.id, 2, EventType.NODE_STARTED, "c"))
    with pytest.raises(Conflict), anyio.fail_after(5):
        await store.finish([taken, after])
    assert [e.data["node"] for e in await store.events(run.id)] == ["a"]


async def test_written_events_are_published_in_the_order_written_before_record_returns(
    store: SqlStore,
) -> None:
    runs = [(await store.create_run("brief", 1, None))[0].id for _ in range(3)]
    published: list[Event] = []
    calls: list[int] = []

    async def publish(events: Sequence[Event]) -> None:
        calls.append(len(events))
        await anyio.lowlevel.checkpoint()  # as a bus that suspends does
        published.extend(events)

    async def record(run_id: str, seq: int) -> None:
        event = node_event(run_id, seq, EventType.NODE_STARTED, f"n{seq}")
        if seq % 3:
            await store.record(event, publish=publish)
        else:
            await store.finish([store.record_later(event, publish=publish)])
        assert event in published  # published before its caller goes on

    async with anyio.create_task_group() as tg:
        for seq in range(1, 41):
            for run_id in runs:
                tg.start_soon(record, run_id, seq)
    assert len(published) == 120
    assert len(calls) < 120  # written together, published together
    gids = [e.gid for e in published]
    assert gids == sorted(gids)
    for run_id in runs:
        assert [e.seq for e in published if e.run_id == run_id] == list(range(1, 41))


async def test_a_failed_publish_fails_its_record_and_the_event_stays_written(store: SqlStore) -> None:
    run, _ = await store.create_run("brief", 1, None)

    async def publish(events: Sequence[Event]) -> None:
        raise ConnectionError("the bus is gone")

    with pytest.raises(ConnectionError, match="the bus is gone"):
        await store.record(node_event(run.id, 1, EventType.NODE_STARTED, "a"), publish=publish)
    assert [e.seq for e in await store.events(run.id)] == [1]


async def test_cancelled_callers_events_are_still_written(open_store: Opener) -> None:
    # Small batches, so most callers are still queued (not yet in a transaction) when cancelled.
    store = await open_store(batch_size=4)
    run, _ = await store.create_run("brief", 1, None)
    entered = 0
    all_entered = anyio.Event()

    async def record(seq: int) -> None:
        nonlocal entered
        entered += 1
        if entered == 30:
            all_entered.set()
        await store.record(node_event(run.id, seq, EventType.NODE_STARTED, "a"))

    async with anyio.create_task_group() as tg:
        for seq in range(1, 31):
            tg.start_soon(record, seq)
        await all_entered.wait()
        tg.cancel_scope.cancel()

    await store.record(node_event(run.id, 31, EventType.NODE_STARTED, "a"))
    assert [e.seq for e in await store.events(run.id)] == list(range(1, 32))
    assert (await store.get_run(run.id)).last_seq == 31


async def test_timestamps_round_trip_as_aware_utc(store: SqlStore) -> None:
    run, _ = await store.create_run("brief", 1, None)
    tokyo = datetime(2025, 6, 1, 9, 0, 0, 250000, tzinfo=timezone(timedelta(hours=9)))
    await store.record(
        Event(run_id=run.id, seq=1, type=EventType.WORKFLOW_STARTED, graph="brief", at=tokyo),
        RunUpdate(status=RunStatus.RUNNING, at=tokyo),
    )
    got = await store.get_run(run.id)
    assert got.started_at == tokyo
    assert got.started_at is not None
    assert got.started_at.utcoffset() == timedelta(0)
    (event,) = await store.events(run.id)
    assert (event.at, event.at.utcoffset()) == (tokyo, timedelta(0))


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqlStore]:
    """A store on a SQLite file, for what only SQLite does."""
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'braid.db'}")
    await store.start()
    try:
        yield store
    finally:
        await store.close()


async def test_sqlite_point_reads_fall_back_to_a_reader_thread_when_sqlite_is_busy(
    sqlite_store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = sqlite_store
    run, _ = await store.create_run("brief", 1, {"topic": "x", "n": [1, 2]}, "key-1")
    await store.record(
        Event(run_id=run.id, seq=1, type=EventType.WORKFLOW_STARTED, graph="brief", at=T0),
        RunUpdate(status=RunStatus.RUNNING, at=T0),
    )
    quick = await store.get_run(run.id)
    assert (quick.status, quick.started_at, quick.input, quick.last_seq) == (
        RunStatus.RUNNING,
        T0,
        {"topic": "x", "n": [1, 2]},
        1,
    )

    def busy(*_: Any) -> Any:
        raise sqlite3.OperationalError("database is locked")

    points = store._points  # pyright: ignore[reportPrivateUsage]
    assert points is not None
    monkeypatch.setattr(points, "run", busy)
    monkeypatch.setattr(points, "latest_version", busy)
    assert await store.get_run(run.id) == quick
    await store.create_graph("brief", SPEC, None, 1)
    assert (await store.get_graph("brief")).version == 1
    with pytest.raises(NotFound):
        await store.get_run("missing")


async def test_sqlite_writes_wait_for_another_writer_without_stalling_the_event_loop(
    sqlite_store: SqlStore, tmp_path: Path
) -> None:
    """Small batches are written on the event loop; when another process holds SQLite's write
    lock, the batch waits for it in the writer thread, and the loop goes on meanwhile."""
    store = sqlite_store
    run, _ = await store.create_run("brief", 1, None)
    other = sqlite3.connect(tmp_path / "braid.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process's write transaction
    recorded = anyio.Event()
    longest_stall = 0.0

    async def record() -> None:
        await store.record(
            Event(run_id=run.id, seq=1, type=EventType.WORKFLOW_STARTED, graph="brief", at=T0),
            RunUpdate(status=RunStatus.RUNNING, at=T0),
        )
        recorded.set()

    async def tick_until_recorded() -> None:
        nonlocal longest_stall
        last = anyio.current_time()
        while not recorded.is_set():
            await anyio.sleep(0.005)
            now = anyio.current_time()
            longest_stall = max(longest_stall, now - last)
            last = now

    try:
        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                tg.start_soon(record)
                tg.start_soon(tick_until_recorded)
                for _ in range(40):  # 0.2 s or more of the loop going round, the lock still held
                    await anyio.sleep(0.005)
                    assert not recorded.is_set(), "written while another connection held the write lock"
                other.execute("COMMIT")
                await recorded.wait()
    finally:
        other.close()
    assert longest_stall < 1.0, f"the event loop stalled {longest_stall:.2f}s waiting for SQLite's lock"
    assert [e.seq for e in await store.events(run.id)] == [1]
    after = await store.get_run(run.id)
    assert (after.status, after.last_seq) == (RunStatus.RUNNING, 1)


async def test_sqlite_batches_written_on_the_event_loop_are_checkpointed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event loop's connection never checkpoints the WAL itself (that fsyncs): the writer
    thread does, every few commits, so what is written reaches the database file."""
    monkeypatch.setattr("server.store.sql.INLINE_CHECKPOINT_EVERY", 5)
    monkeypatch.setattr("server.store.sql.INLINE_LAP", 1.0)  # the loop counts as idle however slow
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'braid.db'}")
    await store.start()
    try:
        run, _ = await store.create_run("brief", 1, None)
        for seq in range(1, 11):  # one at a time: each on the loop
            await store.record(node_event(run.id, seq, EventType.NODE_STARTED, f"n{seq}"))

        def events_in_the_database_file() -> int:
            copy = tmp_path / "copy.db"  # the main file alone, as of the last checkpoint
            copy.write_bytes((tmp_path / "braid.db").read_bytes())
            conn = sqlite3.connect(copy)
            try:
                return conn.execute("SELECT count(*) FROM events WHERE run_id = ?", (run.id,)).fetchone()[0]
            except sqlite3.DatabaseError:
                return -1  # copied while a checkpoint was writing it
            finally:
                conn.close()

        # The 5th commit on the loop (the run's creation was the 1st) is the 4th event: its
        # checkpoint copies what was committed when it starts, so at least those 4; more when
        # the writer thread starts it late (expecting 5 made this test depend on that race).
        with anyio.fail_after(10):
            while events_in_the_database_file() < 4:  # noqa: ASYNC110 (a thread checkpoints: polled)
                await anyio.sleep(0.02)
        assert [e.seq for e in await store.events(run.id)] == list(range(1, 11))
    finally:
        await store.close()


def test_sqlite_rows_hold_what_sqlalchemy_would_bind() -> None:
    """The writer's own timestamp and JSON conversions give SQLAlchemy's text, value for value."""
    engine = create_engine("sqlite+pysqlite://", json_serializer=_dumps)
    batches = _SqliteBatches(engine)
    dialect = engine.dialect
    tokyo = timezone(timedelta(hours=9))
    times = [
        None,
        datetime(2025, 1, 2, 3, 4, 5, 123456),
        datetime(2025, 1, 2, 3, 4, 5),
        datetime(999, 12, 31, 23, 59, 59, 1, tzinfo=UTC),
        datetime(2025, 1, 2, 3, 4, 5, 6, tzinfo=tokyo),
    ]
    documents = [None, {"a": [1, "é", None], "b": {"c": 1.5}}, [], "text", 3, 1.5, True, {}]
    tables = ((EVENTS, batches.EVENT_COLUMNS), (NODES, batches.node_columns), (RUNS, batches.run_columns))
    checked = 0
    for table, names in tables:
        ours = batches.processors(table, names)
        for name, mine in zip(names, ours, strict=True):
            theirs = table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            if mine is theirs:
                continue
            assert mine is not None, name
            assert theirs is not None, name
            samples = times if isinstance(table.c[name].type, UTCDateTime) else documents
            assert [mine(v) for v in samples] == [theirs(v) for v in samples], f"{table.name}.{name}"
            checked += 1
    assert checked >= 8  # at, data; output, usage, started_at, finished_at; runs' times and JSON


async def test_an_in_memory_sqlite_store_keeps_runs_and_events() -> None:
    """``:memory:`` has no writer thread nor point reads: its runs and events go through the
    SQLAlchemy statements."""
    store = SqlStore("sqlite+aiosqlite:///:memory:")
    await store.start()
    try:
        await store.create_graph("brief", SPEC, None, 1)
        run, _ = await store.create_run("brief", 1, {"topic": "x"})
        await record_a_run(store, run.id)
        end = T0 + timedelta(seconds=9)
        await store.record(
            Event(run_id=run.id, seq=10, type=EventType.WORKFLOW_FINISHED, graph="brief", at=end),
            RunUpdate(status=RunStatus.SUCCEEDED, at=end, output={"text": "x"}),
        )
        done = await store.get_run(run.id)
        assert (done.status, done.output, done.started_at, done.finished_at, done.last_seq) == (
            RunStatus.SUCCEEDED,
            {"text": "x"},
            T0,
            end,
            10,
        )
        events = await store.events(run.id)
        assert [e.seq for e in events] == list(range(1, 11))
        assert [e.gid for e in events] == sorted(e.gid or 0 for e in events)
        assert [(n.node, n.index, n.status) for n in await store.node_executions(run.id)][:3] == [
            ("a", None, NodeStatus.SUCCEEDED),
            ("a", 0, NodeStatus.SUCCEEDED),
            ("b", None, NodeStatus.SKIPPED),
        ]
    finally:
        await store.close()


async def test_reopened_store_sees_everything(open_store: Opener) -> None:
    first = await open_store()
    await first.create_graph("brief", SPEC, None, 1)
    run, _ = await first.create_run("brief", 1, {"topic": "x"}, idempotency_key="k")
    await record_a_run(first, run.id)
    await first.close()

    second = await open_store()
    assert (await second.get_graph("brief")).spec == SPEC
    assert (await second.get_run(run.id)).last_seq == 9
    assert len(await second.events(run.id)) == 9
    assert len(await second.node_executions(run.id)) == 4
    again, created = await second.create_run("brief", 1, {}, idempotency_key="k")
    assert (again.id, created) == (run.id, False)
    newer, _ = await second.create_run("brief", 1, {})
    assert newer.id > run.id


async def test_schema_version_mismatch_says_what_to_do(open_store: Opener, database_url: str) -> None:
    store = await open_store()
    await store.create_graph("brief", SPEC, None, 1)
    await store.close()
    if database_url.startswith("sqlite"):
        with sqlite3.connect(database_url.split("///", 1)[1]) as conn:
            conn.execute("UPDATE schema_version SET version = 999")
    else:
        await _admin(database_url, "UPDATE schema_version SET version = 999")

    with pytest.raises(
        SetupError, match=rf"version 999.*needs schema version {SCHEMA_VERSION}.*BRAID_DATABASE_URL"
    ):
        await open_store()


async def test_ping(store: SqlStore) -> None:
    assert await store.ping()


async def test_ping_is_false_when_the_database_is_unreachable() -> None:
    store = SqlStore("postgresql+asyncpg://postgres@127.0.0.1:9/none")
    assert not await store.ping()
    await store.close()


@pytest.mark.postgres
async def test_postgres_statements_ride_out_connections_postgres_dropped(postgres_database: str) -> None:
    url = postgres_database
    await _admin(url, "DROP SCHEMA public CASCADE", "CREATE SCHEMA public")
    store = SqlStore(url)
    await store.start()
    try:
        run, _ = await store.create_run("brief", 1, {"n": 1})
        await store.record(Event(run_id=run.id, seq=1, type=EventType.WORKFLOW_STARTED, graph="brief", at=T0))
        assert (await store.get_run(run.id)).last_seq == 1
        # As a Postgres restart would: every connection the store has pooled is gone.
        await _admin(
            url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        assert (await store.get_run(run.id)).last_seq == 1
        await _admin(
            url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        await store.record(
            Event(run_id=run.id, seq=2, type=EventType.WORKFLOW_FINISHED, graph="brief", at=T0),
            RunUpdate(status=RunStatus.SUCCEEDED, at=T0, output="done"),
        )
        done = await store.get_run(run.id)
        assert (done.status, done.output, done.last_seq) == (RunStatus.SUCCEEDED, "done", 2)
        assert [e.seq for e in await store.events(run.id)] == [1, 2]
    finally:
        await store.close()
