"""Live events over SSE, against a real server process (the ASGI test client cannot read an
endless stream): ``GET /runs/{id}/events``, ``POST /graphs/{name}/runs?stream=true`` and the
global feed ``GET /events``."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.server_process import ServerProcess, running_server
from tests.sse_client import Frame, iter_frames, read_frames

pytestmark = pytest.mark.anyio

CHAIN = ["a", "b", "c"]
LONG_WAIT = 4.0

GRAPHS: dict[str, dict[str, Any]] = {
    "chain": {
        "nodes": {
            "a": {"agent": "template", "template": "hello {{ input.name }}"},
            "b": {"agent": "template", "template": "{{ outputs.a }}!"},
            "c": {"agent": "template", "template": "{{ outputs.b }}?"},
        },
        "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}],
    },
    "slow": {
        "nodes": {
            "a": {"agent": "template", "template": "start"},
            "w": {"agent": "wait", "seconds": 1.5},
            "b": {"agent": "template", "template": "done"},
        },
        "edges": [{"from": "a", "to": "w"}, {"from": "w", "to": "b"}],
    },
    "long": {
        "nodes": {
            "a": {"agent": "template", "template": "start"},
            "w": {"agent": "wait", "seconds": LONG_WAIT},
            "b": {"agent": "template", "template": "done"},
        },
        "edges": [{"from": "a", "to": "w"}, {"from": "w", "to": "b"}],
    },
    "broken": {"nodes": {"a": {"agent": "template", "template": "{{ input.missing.x }}"}}},
    "feed-a": {
        "nodes": {
            "x": {"agent": "template", "template": "x"},
            "y": {"agent": "template", "template": "y"},
        },
        "edges": [{"from": "x", "to": "y"}],
    },
    "feed-b": {"nodes": {"only": {"agent": "template", "template": "b"}}},
    "tail": {"nodes": {"only": {"agent": "template", "template": "t"}}},
    "talk": {"nodes": {"say": {"agent": "llm", "prompt": "Say hello to {{ input.name }}"}}},
}


def create_graphs(url: str, names: list[str]) -> None:
    for name in names:
        response = httpx.post(f"{url}/graphs", json={"name": name, **GRAPHS[name]})
        assert response.status_code == 201, response.text


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("sse"), {"BRAID_SSE_PING": "0.3"}) as process:
        create_graphs(process.url, list(GRAPHS))
        yield process


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as http:
        yield http


async def start_run(client: httpx.AsyncClient, graph: str, input: Any = None, *, wait: bool = False) -> str:
    response = await client.post(
        f"/graphs/{graph}/runs",
        params={"wait": "true"} if wait else None,
        json={"input": {"name": "Ada"} if input is None else input},
    )
    assert response.status_code == (200 if wait else 202), response.text
    return str(response.json()["id"])


def names(frames: list[Frame]) -> list[str]:
    return [f"{f.event} {f.json().get('node', '')}".strip() for f in frames]


def ids(frames: list[Frame]) -> list[int]:
    return [int(f.id or 0) for f in frames]


def expected_chain(nodes: list[str]) -> list[str]:
    middle = [f"node.{what} {node}" for node in nodes for what in ("started", "completed")]
    return ["workflow.started", *middle, "workflow.finished"]


def is_event(name: str, node: str | None = None) -> Callable[[Frame], bool]:
    return lambda frame: frame.event == name and (node is None or frame.json().get("node") == node)


async def poll(check: Callable[[], Any], within: float = 10.0, what: str = "condition") -> Any:
    """Call ``check`` (sync or async) until it returns something truthy; fail after ``within`` s."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if hasattr(last, "__await__"):
            last = await last
        if last:
            return last
        await anyio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


# --- one run's stream --------------------------------------------------------------------------


async def test_lifecycle_arrives_in_order_and_the_stream_closes(client: httpx.AsyncClient) -> None:
    run_id = await start_run(client, "chain", {"name": "Ada"})
    frames = await read_frames(client, f"/runs/{run_id}/events")  # returns only when the server closes

    assert names(frames) == expected_chain(CHAIN)
    assert ids(frames) == list(range(1, len(frames) + 1))
    for frame in frames:
        event = frame.json()
        assert event["type"] == frame.event
        assert event["id"] == int(frame.id or 0)
        assert event["run_id"] == run_id
        assert event["graph"] == "chain"
    assert frames[0].json()["input"] == {"name": "Ada"}
    finished = frames[-1].json()
    assert finished["status"] == "succeeded"


async def test_stream_true_streams_the_run_from_workflow_started(client: httpx.AsyncClient) -> None:
    frames: list[Frame] = []
    with anyio.fail_after(15):
        async with client.stream(
            "POST", "/graphs/chain/runs", params={"stream": "true"}, json={"input": {"name": "Ada"}}
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            frames = [frame async for frame in iter_frames(r)]
    assert names(frames) == expected_chain(CHAIN)
    assert ids(frames) == list(range(1, len(frames) + 1))


async def test_a_run_goes_on_when_its_streaming_client_leaves(client: httpx.AsyncClient) -> None:
    run_id = ""
    with anyio.fail_after(15):
        stream = client.stream("POST", "/graphs/slow/runs", params={"stream": "true"}, json={"input": {}})
        async with stream as response:
            async for frame in iter_frames(response):
                run_id = frame.json()["run_id"]
                break  # disconnect right after workflow.started
    assert run_id

    async def run_ended() -> bool:
        return (await client.get(f"/runs/{run_id}")).json()["status"] == "succeeded"

    await poll(run_ended, what="the run to succeed without a client")
    frames = await read_frames(client, f"/runs/{run_id}/events")
    assert names(frames) == expected_chain(["a", "w", "b"])


async def test_subscribing_right_after_starting_gets_workflow_started(client: httpx.AsyncClient) -> None:
    run_id = await start_run(client, "slow")
    frames = await read_frames(client, f"/runs/{run_id}/events")
    assert frames[0].event == "workflow.started"
    assert names(frames) == expected_chain(["a", "w", "b"])


async def test_subscribing_after_the_run_ended_replays_it_and_closes(client: httpx.AsyncClient) -> None:
    run_id = await start_run(client, "chain", wait=True)
    frames = await read_frames(client, f"/runs/{run_id}/events", within=5)
    assert names(frames) == expected_chain(CHAIN)
    assert ids(frames) == list(range(1, len(frames) + 1))


async def test_resume_a_live_run_by_last_event_id_and_by_after(client: httpx.AsyncClient) -> None:
    run_id = await start_run(client, "slow")
    url = f"/runs/{run_id}/events"
    # Read up to the wait node starting, then disconnect while the run is still running.
    first = await read_frames(client, url, until=is_event("node.started", "w"))
    seen = int(first[-1].id or 0)
    assert (await client.get(f"/runs/{run_id}")).json()["status"] == "running"

    resumed: dict[str, list[Frame]] = {}
    async with anyio.create_task_group() as tg:

        async def resume(how: str, **kwargs: Any) -> None:
            resumed[how] = await read_frames(client, url, **kwargs)

        tg.start_soon(lambda: resume("header", headers={"Last-Event-ID": str(seen)}))
        tg.start_soon(lambda: resume("query", params={"after": seen}))

    full = await read_frames(client, url)
    assert names(full) == expected_chain(["a", "w", "b"])
    assert first == full[:seen]
    for how in ("header", "query"):
        assert resumed[how] == full[seen:], how
        assert ids(resumed[how])[0] == seen + 1


async def test_resume_a_finished_run(client: httpx.AsyncClient) -> None:
    run_id = await start_run(client, "chain", wait=True)
    url = f"/runs/{run_id}/events"
    full = await read_frames(client, url)
    total = len(full)

    assert await read_frames(client, url, headers={"Last-Event-ID": "3"}) == full[3:]
    assert await read_frames(client, url, params={"after": 3}) == full[3:]
    # with both, the later cursor counts: a browser reconnects to its first URL with a newer header
    assert await read_frames(client, url, params={"after": 5}, headers={"Last-Event-ID": "1"}) == full[5:]
    assert await read_frames(client, url, params={"after": 1}, headers={"Last-Event-ID": "5"}) == full[5:]
    # everything already seen: an empty stream that closes at once
    assert await read_frames(client, url, params={"after": total}, within=5) == []


async def test_bad_cursor_is_422_and_unknown_run_is_404(client: httpx.AsyncClient) -> None:
    run_id = await start_run(client, "chain", wait=True)
    for params, headers in (({"after": "x"}, {}), ({"after": "-1"}, {}), ({}, {"Last-Event-ID": "nope"})):
        response = await client.get(f"/runs/{run_id}/events", params=params, headers=headers)
        assert response.status_code == 422, (params, headers, response.text)
        assert response.json()["status_code"] == 422
    response = await client.get("/runs/no-such-run/events", headers={"Accept": "text/event-stream"})
    assert response.status_code == 404
    assert response.json()["status_code"] == 404
    response = await client.get("/runs/no-such-run/events", headers={"Accept": "application/json"})
    assert response.status_code == 404


async def test_json_list_with_accept_application_json(client: httpx.AsyncClient) -> None:
    run_id = await start_run(client, "chain", wait=True)
    response = await client.get(f"/runs/{run_id}/events", headers={"Accept": "application/json"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    events = response.json()
    assert [e["id"] for e in events] == list(range(1, 9))
    assert events[0]["type"] == "workflow.started"
    assert events[-1]["type"] == "workflow.finished"
    streamed = await read_frames(client, f"/runs/{run_id}/events")
    assert [f.json() for f in streamed] == events

    after = await client.get(
        f"/runs/{run_id}/events", params={"after": 6}, headers={"Accept": "application/json"}
    )
    assert [e["id"] for e in after.json()] == [7, 8]


async def test_early_failure_still_ends_the_stream(client: httpx.AsyncClient) -> None:
    run_id = await start_run(client, "broken")
    frames = await read_frames(client, f"/runs/{run_id}/events")
    assert frames[0].event == "workflow.started"
    assert "node.failed a" in names(frames)
    finished = frames[-1]
    assert finished.event == "workflow.finished"
    assert finished.json()["status"] == "failed"
    assert finished.json()["error"]


async def test_keep_alive_pings_flow_while_the_run_is_idle(client: httpx.AsyncClient) -> None:
    run_id = await start_run(client, "slow")
    comments = 0
    with anyio.fail_after(15):
        async with client.stream("GET", f"/runs/{run_id}/events") as response:
            async for frame in iter_frames(response, comments=True):
                comments += frame.comment is not None
    assert comments >= 1  # BRAID_SSE_PING=0.3 and the run waits 1.5 s


async def test_many_subscribers_get_everything_and_leavers_free_their_resources(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    async def debug() -> dict[str, int]:
        response = await client.get("/debug/subscribers")
        assert response.status_code == 200
        return response.json()

    # sse-starlette starts one shutdown watcher per process with the first stream it serves:
    # open (and finish) one stream first, so the baseline counts it.
    await read_frames(client, f"/runs/{await start_run(client, 'chain', wait=True)}/events")
    base = await debug()
    run_id = await start_run(client, "long")
    url = f"/runs/{run_id}/events"
    reached_wait = 0
    all_waiting = anyio.Event()
    leave = anyio.Event()
    stayed: list[list[Frame]] = []

    async def subscriber(index: int, http: httpx.AsyncClient) -> None:
        nonlocal reached_wait
        frames: list[Frame] = []
        async with http.stream("GET", url) as response:
            assert response.status_code == 200
            async for frame in iter_frames(response):
                frames.append(frame)
                if is_event("node.started", "w")(frame):
                    reached_wait += 1
                    if reached_wait == 200:
                        all_waiting.set()
                    if index < 100:
                        await leave.wait()
                        return  # disconnect mid-run
        stayed.append(frames)

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as http:
        with anyio.fail_after(LONG_WAIT + 20):
            async with anyio.create_task_group() as tg:
                for index in range(200):
                    tg.start_soon(subscriber, index, http)
                await all_waiting.wait()
                crowded = await debug()
                assert crowded["subscribers"] == base["subscribers"] + 200
                leave.set()
                # The 100 that left are released while the run is still running.
                await poll(
                    lambda: _subscribers_are(debug, base["subscribers"] + 100),
                    what="the subscriptions of the disconnected clients to be released",
                )
                per_stream = (crowded["tasks"] - base["tasks"]) / 200
                await poll(
                    lambda: _tasks_at_most(debug, base["tasks"] + 100 * per_stream + 5),
                    what="the tasks of the disconnected clients to end",
                )
                assert (await client.get(f"/runs/{run_id}")).json()["status"] == "running"

    assert len(stayed) == 100
    for frames in stayed:
        assert names(frames) == expected_chain(["a", "w", "b"])
        assert ids(frames) == list(range(1, len(frames) + 1))
    await poll(lambda: _subscribers_are(debug, base["subscribers"]), what="every subscription to be released")
    await poll(lambda: _tasks_at_most(debug, base["tasks"]), what="the task count to return to its baseline")


FLOOD_BYTES = 5_000_000


async def test_a_client_that_stops_reading_is_cut_off_and_holds_up_no_one(tmp_path: Path) -> None:
    """A client that accepts no bytes (a frozen tab, a stalled proxy) on a run that sends
    megabytes: once nothing has gone out to it for the send timeout (1 s here), its stream ends
    and its tasks with it, the server closes its connection, and the log says so in one line;
    the run, and another client reading the same run, get everything."""
    flood = {
        "name": "flood",
        "nodes": {
            "w": {"agent": "wait", "seconds": 1},
            # 50 x 100,000 characters: a node.completed and a workflow.finished of 5 MB each, more
            # than the socket buffers (4 MB at most) and uvicorn's write buffer take.
            "big": {"agent": "template", "template": "{% for _ in 'x' * 50 %}{{ 'x' * 100000 }}{% endfor %}"},
        },
        "edges": [{"from": "w", "to": "big"}],
    }
    with running_server(tmp_path, {"BRAID_SSE_SEND_TIMEOUT": "1"}) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:

            async def debug() -> dict[str, int]:
                return (await client.get("/debug/subscribers")).json()

            for spec in (flood, {"name": "tiny", **GRAPHS["tail"]}):
                assert (await client.post("/graphs", json=spec)).status_code == 201
            # The first stream starts sse-starlette's shutdown watcher: the baseline counts it.
            await read_frames(client, f"/runs/{await start_run(client, 'tiny', wait=True)}/events")
            base = await debug()
            run_id = await start_run(client, "flood")
            with socket.socket() as stalled:
                # A small receive window, set before connecting: the server's sends soon wait.
                stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                stalled.settimeout(30)
                stalled.connect(("127.0.0.1", server.port))
                request = (
                    f"GET /runs/{run_id}/events HTTP/1.1\r\nHost: braid\r\nAccept: text/event-stream\r\n\r\n"
                )
                stalled.sendall(request.encode())
                await poll(
                    lambda: _subscribers_are(debug, base["subscribers"] + 1), what="the stalled stream"
                )

                frames = await read_frames(client, f"/runs/{run_id}/events", within=30)
                assert names(frames) == expected_chain(["w", "big"])
                assert len(frames[-1].json()["output"]) == FLOOD_BYTES
                await poll(
                    lambda: _tasks_at_most(debug, base["tasks"]), what="the stalled stream's tasks to end"
                )

                # Its connection is closed: what the server had buffered, then the end (read with
                # a larger buffer, else the small window makes it take a minute).
                stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
                received = 0
                while chunk := await anyio.to_thread.run_sync(stalled.recv, 1 << 20):
                    received += len(chunk)
                assert 0 < received < 2 * FLOOD_BYTES  # not every event reached it
    log = server.log()
    assert "an SSE client accepted nothing for 1s: its stream was closed" in log
    assert "Exception in ASGI application" not in log


async def _subscribers_are(debug: Callable[[], Any], count: int) -> bool:
    return (await debug())["subscribers"] == count


async def _tasks_at_most(debug: Callable[[], Any], count: float) -> bool:
    return (await debug())["tasks"] <= count


# --- the global feed ---------------------------------------------------------------------------


async def test_feed_delivers_concurrent_runs_and_resumes_by_global_id(client: httpx.AsyncClient) -> None:
    # after=0 with a graph nobody else runs: the feed is subscribed before any of its events exist.
    feed: list[Frame] = []
    finished = 0
    run_ids: set[str] = set()

    def all_finished(frame: Frame) -> bool:
        nonlocal finished
        finished += frame.event == "workflow.finished"
        return finished == 4

    async with anyio.create_task_group() as tg:

        async def follow() -> None:
            feed.extend(
                await read_frames(
                    client, "/events", params={"after": 0, "graph": "feed-a"}, until=all_finished
                )
            )

        before = (await client.get("/debug/subscribers")).json()["subscribers"]
        tg.start_soon(follow)
        await poll(lambda: _subscribers_at_least(client, before + 1), what="the feed to connect")
        async with anyio.create_task_group() as starters:

            async def start() -> None:
                run_ids.add(await start_run(client, "feed-a"))
                await start_run(client, "feed-b")  # filtered out by ?graph=

            for _ in range(4):
                starters.start_soon(start)

    events = [frame.json() for frame in feed]
    assert len(events) == 4 * 6
    assert {e["run_id"] for e in events} == run_ids
    assert {e["graph"] for e in events} == {"feed-a"}
    assert all(e["gid"] == int(f.id or 0) for e, f in zip(events, feed, strict=True))
    assert len(set(ids(feed))) == len(feed)
    for run_id in run_ids:
        per_run = [f for f in feed if f.json()["run_id"] == run_id]
        assert names(per_run) == expected_chain(["x", "y"])
        assert [f.json()["id"] for f in per_run] == list(range(1, 7))

    # resume from the middle, by ?after= and by Last-Event-ID: exactly the rest, in order
    ordered = sorted(feed, key=lambda f: int(f.id or 0))
    middle = ordered[9].id or ""
    rest = ordered[10:]
    for params, headers in (
        ({"after": middle, "graph": "feed-a"}, {}),
        ({"graph": "feed-a"}, {"Last-Event-ID": middle}),
    ):
        count = 0

        def enough(_: Frame) -> bool:
            nonlocal count
            count += 1
            return count == len(rest)

        assert await read_frames(client, "/events", params=params, headers=headers, until=enough) == rest


async def _subscribers_at_least(client: httpx.AsyncClient, count: int) -> bool:
    return (await client.get("/debug/subscribers")).json()["subscribers"] >= count


async def test_feed_replay_last_n_then_live(client: httpx.AsyncClient) -> None:
    first = await start_run(client, "tail", wait=True)
    second = await start_run(client, "tail", wait=True)
    assert first != second
    count = 0

    def two(_: Frame) -> bool:
        nonlocal count
        count += 1
        return count == 2

    frames = await read_frames(client, "/events", params={"graph": "tail", "replay": 2}, until=two)
    assert [(f.json()["run_id"], f.event) for f in frames] == [
        (second, "node.completed"),
        (second, "workflow.finished"),
    ]


async def test_feed_has_deltas_only_when_asked(client: httpx.AsyncClient) -> None:
    run_id = await start_run(client, "talk", wait=True)
    run_stream = await read_frames(client, f"/runs/{run_id}/events")
    deltas = [f for f in run_stream if f.event == "node.delta"]
    assert deltas, "the mock model streams its reply"  # a run's own stream has everything
    assert "".join(f.json()["delta"] for f in deltas)

    def until_finished(frame: Frame) -> bool:
        return frame.event == "workflow.finished"

    lifecycle = await read_frames(
        client, "/events", params={"after": 0, "graph": "talk"}, until=until_finished
    )
    assert [f.event for f in lifecycle] == [f.event for f in run_stream if f.event != "node.delta"]
    everything = await read_frames(
        client, "/events", params={"after": 0, "graph": "talk", "deltas": "true"}, until=until_finished
    )
    # the feed's data is the run's event plus its global id, which is also the frame's id
    assert [{**f.json(), "gid": int(f.id or 0)} for f in everything] == [f.json() for f in everything]
    assert [{k: v for k, v in f.json().items() if k != "gid"} for f in everything] == [
        f.json() for f in run_stream
    ]


async def test_streams_end_cleanly_when_the_server_shuts_down(tmp_path: Path) -> None:
    """SIGTERM with a run mid-way and two streams open on it: both responses end properly (the
    last chunk sent, no broken connection) well within uvicorn's graceful timeout, so clients
    reconnect and resume by id; the server exits cleanly."""
    with running_server(tmp_path / "shutdown") as server:
        create_graphs(server.url, ["long"])
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as http:
            run_id = await start_run(http, "long")
            ended: list[list[str]] = []

            async def follow(url: str, params: dict[str, str] | None = None) -> None:
                seen: list[str] = []
                async with http.stream("GET", url, params=params) as response:
                    assert response.status_code == 200
                    async for frame in iter_frames(response):
                        seen.append(f"{frame.event} {frame.json().get('node', '')}".strip())
                        if seen[-1] == "node.started w":
                            waiting.set()
                ended.append(seen)
                if len(ended) == 2:
                    both_ended.set()

            waiting, both_ended = anyio.Event(), anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow, f"/runs/{run_id}/events")
                tg.start_soon(follow, "/events", {"after": "0"})
                with anyio.fail_after(10):
                    await waiting.wait()
                began = time.monotonic()
                server.process.send_signal(signal.SIGTERM)
                with anyio.fail_after(4):  # uvicorn would cut the streams at 5 s
                    await both_ended.wait()
            assert time.monotonic() - began < 4
            assert all("node.started w" in seen and "workflow.finished" not in seen for seen in ended)
        code = await anyio.to_thread.run_sync(lambda: server.process.wait(10))
        # uvicorn (run here as `python -m uvicorn`) raises SIGTERM again once it has shut down.
        assert code in (0, -signal.SIGTERM), server.log()[-3000:]
        assert "returned without completing response" not in server.log()


# --- after a restart (last: it replaces the module's server process) -------------------------


async def test_replay_after_a_restart(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as http:
        run_id = await start_run(http, "chain", wait=True)
        url = f"/runs/{run_id}/events"
        before = (await http.get(url, headers={"Accept": "application/json"})).json()
    # a synchronous stop and start, as a supervisor would do it
    await anyio.to_thread.run_sync(server.restart)
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as http:
        full = await read_frames(http, url)
        assert [f.json() for f in full] == before
        assert names(full) == expected_chain(CHAIN)
        assert await read_frames(http, url, headers={"Last-Event-ID": "2"}) == full[2:]
        assert await read_frames(http, url, params={"after": 4}) == full[4:]


async def test_a_feed_without_cursor_starts_where_the_request_came_not_where_its_stream_got_to(
    tmp_path: Path,
) -> None:
    """The feed's start is fixed when the request is answered: a run that starts and ends before
    the stream's task gets going (as under load) still reaches the client."""
    from server.api.events import stream_feed
    from server.braid import open_braid
    from server.config import Settings

    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'braid.db'}")
    async with open_braid(settings) as braid:
        await braid.store.put_graph("tail", {"name": "tail", **GRAPHS["tail"]}, None, 1)
        response = await stream_feed(braid)  # the request came; its stream has not run yet
        run, _ = await braid.runs.start("tail", {})
        assert (await braid.runs.wait(run.id, 10)).status == "succeeded"

        body = bytearray()
        finished = anyio.Event()
        disconnect = anyio.Event()

        async def receive() -> dict[str, Any]:
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            body.extend(message.get("body", b""))
            if b"workflow.finished" in body:
                finished.set()

        scope = {"type": "http", "method": "GET", "path": "/events", "headers": []}
        async with anyio.create_task_group() as tg:
            tg.start_soon(response, scope, receive, send)
            with anyio.fail_after(5):
                await finished.wait()
            disconnect.set()
        text = body.decode()
        assert f'"run_id":"{run.id}"' in text
        assert [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("event:")] == [
            "workflow.started",
            "node.started",
            "node.completed",
            "workflow.finished",
        ]
