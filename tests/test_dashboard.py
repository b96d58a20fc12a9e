"""The dashboard's pages, fragments and live feeds (through the app), and the graph diagram."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from html import unescape
from typing import Any

import httpx
import pytest
import yaml
from litestar.testing import AsyncTestClient

from agents.registry import default_registry
from server.config import Settings
from server.events import Event
from server.graph.fields import ValidationContext
from server.graph.model import Graph
from server.graph.parse import build_graph
from server.status import EventType
from server.web import diagram, views
from tests.conftest import PROMPTS_DIR
from tests.server_process import running_server
from tests.sse_client import Frame, read_frames

pytestmark = pytest.mark.anyio

Client = AsyncTestClient[Any]

PIPELINE = """
name: pipeline
description: Greet, then shout.
input:
  type: object
  required: [who]
  properties: {who: {type: string, minLength: 1}}
nodes:
  greet: {agent: template, template: "hello {{ input.who }}"}
  shout: {agent: template, value: "outputs.greet | upper"}
edges:
  - {from: greet, to: shout}
output: outputs.shout
"""

WRITER = """
name: writer
nodes:
  write: {agent: llm, prompt: "Say something about {{ input.topic }}."}
"""

FAN = """
name: fan
nodes:
  angles: {agent: template, value: "['tides', 'moons']"}
  say: {agent: llm, map: outputs.angles, prompt: "Say something about {{ item }}."}
edges:
  - {from: angles, to: say}
"""

SLOW = """
name: slow
nodes:
  nap: {agent: wait, seconds: 30}
"""

LOOP = """
name: loop
nodes:
  plan: {agent: template, template: plan}
  research: {agent: template, template: research}
  write: {agent: template, template: "draft {{ iteration }}"}
  critic: {agent: template, value: "{'approved': iteration >= 1}"}
  publish: {agent: template, template: done}
edges:
  - {from: plan, to: [research, write]}
  - {from: research, to: write}
  - {from: write, to: critic}
  - {from: critic, to: write, when: "not outputs.critic.approved"}
  - {from: critic, to: publish}
"""


async def store_graph(client: Client, spec: str) -> None:
    answer = await client.post("/graphs", content=spec, headers={"Content-Type": "application/yaml"})
    assert answer.status_code == 201, answer.text


async def finished_run(client: Client, graph: str, input: Any) -> dict[str, Any]:
    answer = await client.post(f"/graphs/{graph}/runs", params={"wait": "true"}, json={"input": input})
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real server: the test client cannot read a stream that does not end (the live feeds)."""
    with running_server(tmp_path_factory.mktemp("dashboard")) as server:
        for spec in (PIPELINE, SLOW):
            answer = httpx.post(
                f"{server.url}/graphs", content=spec, headers={"Content-Type": "application/yaml"}
            )
            assert answer.status_code == 201, answer.text
        yield server.url


@pytest.fixture
async def live(live_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=live_url, timeout=30) as client:
        yield client


async def start_live(client: httpx.AsyncClient, graph: str, input: Any, wait: bool = False) -> str:
    answer = await client.post(
        f"/graphs/{graph}/runs", params={"wait": str(wait).lower()}, json={"input": input}
    )
    assert answer.status_code in (200, 202), answer.text
    return str(answer.json()["id"])


def build(spec: str) -> Graph:
    return build_graph(yaml.safe_load(spec), default_registry(()), ValidationContext(prompts_dir=PROMPTS_DIR))


# --- pages -----------------------------------------------------------------------------------------


async def test_runs_page_lists_runs_with_their_graph_and_status(client: Client) -> None:
    await store_graph(client, PIPELINE)
    run = await finished_run(client, "pipeline", {"who": "ada"})

    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    row = re.search(rf'<tr id="run-{run["id"]}".*?</tr>', page.text, re.S)
    assert row is not None
    assert "pipeline" in row.group(0)
    assert '<span class="badge status-succeeded">succeeded</span>' in row.group(0)
    # The page follows the live feed, from where its snapshot was taken.
    assert re.search(r'sse-connect="/ui/feed\?after=\d+"', page.text)
    assert "/static/vendor/htmx.min.js" in page.text
    assert "/static/vendor/sse.js" in page.text

    assert f"run-{run['id']}" not in (await client.get("/", params={"status": "failed"})).text
    assert f"run-{run['id']}" not in (await client.get("/", params={"graph": "other"})).text
    filtered = await client.get("/", params={"graph": "pipeline", "status": "succeeded"})
    assert f"run-{run['id']}" in filtered.text
    assert "graph=pipeline" in filtered.text
    assert "status=succeeded" in filtered.text


async def test_header_labels_the_offline_mock_model(client: Client, settings: Settings) -> None:
    assert settings.use_mock_model
    page = await client.get("/")
    assert "offline mock model" in page.text


async def test_finished_run_page_draws_every_node_with_its_status(client: Client) -> None:
    await store_graph(client, PIPELINE)
    run = await finished_run(client, "pipeline", {"who": "ada"})

    page = await client.get(f"/ui/runs/{run['id']}")
    assert page.status_code == 200
    assert page.text.count('<svg class="diagram"') == 1
    for node in ("greet", "shout"):
        assert page.text.count(f'id="node-{node}"') == 1
        assert re.search(rf'<g id="node-{node}" class="node status-succeeded"', page.text)
    assert '<pre id="run-output">HELLO ADA</pre>' in page.text
    assert "&#34;who&#34;: &#34;ada&#34;" in page.text  # the input, as JSON
    assert page.text.count('class="bar status-succeeded"') == 2  # the timeline
    # A finished run needs no stream and offers no Cancel, only Re-run.
    assert "sse-connect" not in page.text
    assert 'id="cancel"' not in page.text
    assert 'id="rerun"' in page.text


async def test_running_run_page_streams_from_its_last_event(live: httpx.AsyncClient) -> None:
    run_id = await start_live(live, "slow", {})
    frames = await read_frames(live, f"/runs/{run_id}/events", until=lambda f: f.event == "node.started")
    last_seq = frames[-1].id

    page = await live.get(f"/ui/runs/{run_id}")
    assert f'sse-connect="/ui/runs/{run_id}/feed?after={last_seq}"' in page.text
    assert 'sse-close="workflow.finished"' in page.text
    assert re.search(r'<g id="node-nap" class="node status-running"', page.text)
    assert f'hx-post="/runs/{run_id}/cancel"' in page.text

    assert (await live.post(f"/runs/{run_id}/cancel")).status_code == 202
    frames = await read_frames(live, f"/ui/runs/{run_id}/feed", params={"after": last_seq})
    assert frames[-1].event == "workflow.finished"
    assert '<span class="badge status-cancelled">cancelled</span>' in frames[-1].data
    assert re.search(r'<g id="node-nap" class="node status-cancelled"', frames[-1].data)


async def test_node_panel_shows_output_attempts_and_duration(client: Client) -> None:
    await store_graph(client, PIPELINE)
    run = await finished_run(client, "pipeline", {"who": "ada"})

    panel = await client.get(f"/ui/runs/{run['id']}/nodes/shout")
    assert panel.status_code == 200
    assert panel.text.startswith('<section id="node-panel"')
    assert "HELLO ADA" in panel.text
    assert "<dt>Attempts</dt><dd>1</dd>" in panel.text
    assert "status-succeeded" in panel.text
    # The page can open with a node selected.
    page = await client.get(f"/ui/runs/{run['id']}", params={"node": "shout"})
    assert 'data-node="shout"' in page.text
    assert (await client.get(f"/ui/runs/{run['id']}/nodes/nope")).status_code == 404


async def test_node_panel_shows_the_input_context_and_the_rendered_prompt(client: Client) -> None:
    await store_graph(client, WRITER)
    run = await finished_run(client, "writer", {"topic": "tides"})

    panel = await client.get(f"/ui/runs/{run['id']}/nodes/write")
    assert panel.status_code == 200
    text = unescape(panel.text)
    assert "<h3>Input context</h3>" in text
    assert '<dt>input</dt><dd><code>{"topic": "tides"}</code></dd>' in text
    assert "<h3>Rendered prompt</h3>" in text
    assert '<pre class="prompt">Say something about tides.</pre>' in text
    assert "<h3>System</h3>" not in text  # the node has no system message
    assert text.index("Rendered prompt") < text.index("<h3>Output</h3>")
    # The page opened with the node selected shows the same.
    page = await client.get(f"/ui/runs/{run['id']}", params={"node": "write"})
    assert "Say something about tides." in unescape(page.text)


async def test_node_panel_of_a_map_shows_an_items_prompt_and_item(client: Client) -> None:
    await store_graph(client, FAN)
    run = await finished_run(client, "fan", {})

    text = unescape((await client.get(f"/ui/runs/{run['id']}/nodes/say")).text)
    item = re.search(r'<dt>item \[(\d)\]</dt><dd><code>"(\w+)"</code></dd>', text)
    assert item is not None
    assert f'<pre class="prompt">Say something about {item.group(2)}.</pre>' in text
    assert ["tides", "moons"][int(item.group(1))] == item.group(2)


async def test_missing_run_and_graph_get_a_404_page(client: Client) -> None:
    for url in ("/ui/runs/no-such-run", "/ui/graphs/no-such-graph"):
        page = await client.get(url)
        assert page.status_code == 404
        assert page.headers["content-type"].startswith("text/html")
        assert "<h1>Not found</h1>" in page.text


async def test_graphs_page_lists_graphs_with_version_nodes_and_last_run(client: Client) -> None:
    await store_graph(client, PIPELINE)
    run = await finished_run(client, "pipeline", {"who": "ada"})

    page = await client.get("/ui/graphs")
    assert page.status_code == 200
    row = re.search(r'<tr id="graph-pipeline">.*?</tr>', page.text, re.S)
    assert row is not None
    assert "v1" in row.group(0)
    assert '<td class="num">2</td>' in row.group(0)
    assert f'href="/ui/runs/{run["id"]}"' in row.group(0)
    assert "status-succeeded" in row.group(0)


async def test_graph_page_shows_diagram_yaml_versions_runs_and_form(client: Client) -> None:
    await store_graph(client, PIPELINE)
    await client.put("/graphs/pipeline", content=PIPELINE.replace("Greet, then shout.", "v2"),
                     headers={"Content-Type": "application/yaml"})  # fmt: skip
    run = await finished_run(client, "pipeline", {"who": "ada"})

    page = await client.get("/ui/graphs/pipeline")
    assert page.status_code == 200
    assert 'id="node-greet"' in page.text
    assert 'id="node-shout"' in page.text
    assert "template: hello {{ input.who }}" in page.text  # the YAML
    assert "<strong>v2</strong>" in page.text
    assert 'href="/ui/graphs/pipeline?version=1"' in page.text
    assert f'href="/ui/runs/{run["id"]}"' in page.text
    assert 'hx-post="/ui/graphs/pipeline/runs"' in page.text
    assert "&#34;who&#34;: &#34;&#34;" in page.text  # the form starts from the input schema

    old = await client.get("/ui/graphs/pipeline", params={"version": 1})
    assert "Greet, then shout." in old.text
    assert "the latest is" in old.text


async def test_start_form_shows_bad_json_and_schema_problems_inline(client: Client) -> None:
    await store_graph(client, PIPELINE)
    htmx = {"HX-Request": "true"}

    bad = await client.post("/ui/graphs/pipeline/runs", data={"input": "{nope"}, headers=htmx)
    assert bad.status_code == 422
    assert bad.text.startswith('<form id="start-form"')
    assert "<code>input</code> is not valid JSON" in bad.text
    assert "{nope</textarea>" in bad.text  # what the user typed stays

    invalid = await client.post("/ui/graphs/pipeline/runs", data={"input": '{"who": ""}'}, headers=htmx)
    assert invalid.status_code == 422
    assert "<code>input.who</code>" in invalid.text
    missing = await client.post("/ui/graphs/pipeline/runs", data={"input": "{}"}, headers=htmx)
    assert "&#39;who&#39; is a required property" in missing.text

    assert (await client.get("/runs")).json()["items"] == []  # nothing started


async def test_start_form_refuses_input_that_is_not_plain_json_or_nested_too_deeply(client: Client) -> None:
    await store_graph(client, PIPELINE)
    htmx = {"HX-Request": "true"}
    for raw, path, message in (
        ('{"who": NaN}', "input.who", "not a JSON number"),
        ('{"who": "\\ud800"}', "input.who", "lone surrogate"),
        ("[" * 100 + "]" * 100, "input", "nested too deeply"),
        ("[" * 5_000 + "]" * 5_000, "input", "nested too deeply"),
    ):
        answer = await client.post("/ui/graphs/pipeline/runs", data={"input": raw}, headers=htmx)
        assert answer.status_code == 422, answer.text[:300]
        assert f"<code>{path}</code>" in answer.text
        assert message in answer.text
    assert (await client.get("/runs")).json()["items"] == []  # nothing started


async def test_start_form_redirects_to_the_new_run(client: Client) -> None:
    await store_graph(client, PIPELINE)
    started = await client.post(
        "/ui/graphs/pipeline/runs", data={"input": '{"who": "bo"}'}, headers={"HX-Request": "true"}
    )
    assert started.status_code == 200
    target = started.headers["HX-Redirect"]
    run_id = target.rsplit("/", 1)[1]
    assert target == f"/ui/runs/{run_id}"
    assert (await client.get(f"/runs/{run_id}")).json()["input"] == {"who": "bo"}

    # Without htmx the form still works: a 303 to the run, or the page with the problems.
    plain = await client.post(
        "/ui/graphs/pipeline/runs", data={"input": '{"who": "cy"}'}, follow_redirects=False
    )
    assert plain.status_code == 303
    assert plain.headers["Location"].startswith("/ui/runs/")
    wrong = await client.post("/ui/graphs/pipeline/runs", data={"input": "[1"})
    assert wrong.status_code == 422
    assert "<h1>pipeline" in wrong.text
    assert "is not valid JSON" in wrong.text


async def test_rerun_starts_the_same_input_again(client: Client) -> None:
    await store_graph(client, PIPELINE)
    run = await finished_run(client, "pipeline", {"who": "ada"})
    answer = await client.post(f"/ui/runs/{run['id']}/rerun", headers={"HX-Request": "true"})
    new_id = answer.headers["HX-Redirect"].rsplit("/", 1)[1]
    assert new_id != run["id"]
    again = (await client.get(f"/runs/{new_id}")).json()
    assert (again["graph"], again["version"], again["input"]) == ("pipeline", 1, {"who": "ada"})


async def test_static_files_are_served(client: Client) -> None:
    css = await client.get("/static/style.css")
    assert css.status_code == 200
    assert "prefers-color-scheme: dark" in css.text
    assert ".status-succeeded" in css.text


# --- live feeds -----------------------------------------------------------------------------------


async def test_run_feed_sends_fragments_with_the_run_streams_names_and_ids(client: Client) -> None:
    await store_graph(client, PIPELINE)
    run = await finished_run(client, "pipeline", {"who": "ada"})
    events = (await client.get(f"/runs/{run['id']}/events", headers={"Accept": "application/json"})).json()

    frames = await read_frames(client, f"/ui/runs/{run['id']}/feed", params={"after": 0})
    # Replayed events waiting together come as one message, named and numbered like the last.
    assert frames[-1].event == "workflow.finished"
    assert frames[-1].id == str(events[-1]["id"])
    html = "".join(f.data for f in frames)
    assert re.search(r'<g id="node-shout" class="node status-succeeded"[^>]*hx-swap-oob="true"', html)
    assert '<section id="run-header" class="run-header" hx-swap-oob="true">' in html
    assert '<pre id="run-output">HELLO ADA</pre>' in html

    # A finished run's feed, asked from its end, still says it ended (so the page closes it).
    end = await read_frames(client, f"/ui/runs/{run['id']}/feed", params={"after": events[-1]["id"]})
    assert [f.event for f in end] == ["workflow.finished"]
    # Last-Event-ID (a browser's own reconnect) wins over a stale ?after=.
    resumed = await read_frames(
        client,
        f"/ui/runs/{run['id']}/feed",
        params={"after": 0},
        headers={"Last-Event-ID": str(events[-2]["id"])},
    )
    assert [f.id for f in resumed] == [str(events[-1]["id"])]


async def test_run_feed_streams_llm_text_without_repeats(client: Client) -> None:
    await store_graph(client, WRITER)
    run = await finished_run(client, "writer", {"topic": "tides"})
    output = run["output"] if run["output"] is not None else run["nodes"][0]["output"]
    events = (await client.get(f"/runs/{run['id']}/events", headers={"Accept": "application/json"})).json()
    started = next(e["id"] for e in events if e["type"] == "node.started")
    deltas = [e for e in events if e["type"] == "node.delta"]
    assert deltas

    frames = await read_frames(client, f"/ui/runs/{run['id']}/feed", params={"after": 0})
    html = "".join(f.data for f in frames)
    # From the start: the node's text is set whole when it starts (replacing, never appending).
    assert re.search(
        r'<div id="live-write" class="live-node" hx-swap-oob="true">\s*<div class="live">.*?'
        r'<pre id="tokens-write" class="tokens">[^<]*</pre>',
        html,
        re.S,
    )

    # From the middle of the stream: only what follows, appended.
    middle = deltas[len(deltas) // 2]["id"]
    frames = await read_frames(client, f"/ui/runs/{run['id']}/feed", params={"after": middle})
    appended = "".join(
        re.findall(
            r'<pre id="tokens-write" hx-swap-oob="beforeend">([^<]*)</pre>', "".join(f.data for f in frames)
        )
    )
    expected = "".join(e["delta"] for e in deltas if e["id"] > middle)
    assert appended.replace("&#39;", "'").replace("&#34;", '"').replace("&amp;", "&") == expected
    # The page rendered at that point holds exactly the text before: together, the whole output.
    assert started < middle
    assert str(output).startswith("".join(e["delta"] for e in deltas if e["id"] <= middle))


def boxes(html: str) -> dict[str, str]:
    """The streamed-text boxes of a page or fragment: each ``<pre>``'s id and (unescaped) text."""
    return {
        m.group(1): unescape(m.group(2))
        for m in re.finditer(r'<pre id="(tokens-[^"]+)" class="tokens">([^<]*)</pre>', html)
    }


async def test_run_page_streams_each_map_item_into_its_own_box(client: Client) -> None:
    await store_graph(client, FAN)
    run = await finished_run(client, "fan", {})
    items = sorted(
        (n for n in run["nodes"] if n["node"] == "say" and n["index"] is not None), key=lambda n: n["index"]
    )
    assert [n["index"] for n in items] == [0, 1]
    events = (await client.get(f"/runs/{run['id']}/events", headers={"Accept": "application/json"})).json()
    deltas = {
        i: "".join(e["delta"] for e in events if e["type"] == "node.delta" and e.get("index") == i)
        for i in (0, 1)
    }
    assert deltas[0]
    assert deltas[1]

    # The page's first render, from the stored events: one box per item, each with its own text.
    page = await client.get(f"/ui/runs/{run['id']}")
    shown = boxes(page.text)
    assert shown["tokens-say.0"] == deltas[0] == str(items[0]["output"])
    assert shown["tokens-say.1"] == deltas[1] == str(items[1]["output"])
    assert not shown.get("tokens-say")  # the mapped node itself streams nothing
    assert "<h3>say[0]</h3>" in page.text
    assert "<h3>say[1]</h3>" in page.text

    # The live feed from the start: the node's block comes whole when an item starts (so its box
    # exists), and every chunk after goes to its own item's box.
    frames = await read_frames(client, f"/ui/runs/{run['id']}/feed", params={"after": 0})
    html = "".join(f.data for f in frames)
    assert '<div id="live-say" class="live-node" hx-swap-oob="true">' in html
    appended: dict[str, str] = {}
    for box, chunk in re.findall(r'<pre id="(tokens-say[^"]*)" hx-swap-oob="beforeend">([^<]*)</pre>', html):
        appended[box] = appended.get(box, "") + unescape(chunk)
    assert set(appended) <= {"tokens-say.0", "tokens-say.1"}

    # From the middle of the stream, after both items started: only the items' own new text.
    middle = max(e["id"] for e in events if e["type"] == "node.started" and e.get("index") is not None)
    frames = await read_frames(client, f"/ui/runs/{run['id']}/feed", params={"after": middle})
    html = "".join(f.data for f in frames)
    for i in (0, 1):
        chunks = re.findall(rf'<pre id="tokens-say\.{i}" hx-swap-oob="beforeend">([^<]*)</pre>', html)
        expected = "".join(
            e["delta"]
            for e in events
            if e["type"] == "node.delta" and e.get("index") == i and e["id"] > middle
        )
        assert unescape("".join(chunks)) == expected


def test_live_text_keeps_map_items_apart_and_shows_a_loops_latest_iteration() -> None:
    def event(seq: int, type: EventType, **data: Any) -> Event:
        return Event("r", seq, type, "g", data)

    started, delta = EventType.NODE_STARTED, EventType.NODE_DELTA
    events = [
        event(1, started, node="say", iteration=0, attempt=1),
        event(2, started, node="say", index=0, iteration=0, attempt=1),
        event(3, started, node="say", index=1, iteration=0, attempt=1),
        event(4, delta, node="say", index=1, delta="Some "),
        event(5, delta, node="say", index=0, delta="A "),
        event(6, delta, node="say", index=1, delta="thoughts"),
        event(7, delta, node="say", index=0, delta="brief"),
        event(8, started, node="write", iteration=0, attempt=1),
        event(9, delta, node="write", delta="first draft"),
        event(10, started, node="write", iteration=1, attempt=1),
        event(11, delta, node="write", delta="second draft"),
    ]
    text = views.live_text(events)
    say = {b.label: b.text for b in text["say"]}
    assert say == {"say": "", "say[0]": "A brief", "say[1]": "Some thoughts"}
    [write] = text["write"]
    assert (write.text, write.note) == ("second draft", "iteration 2")

    # Live: an item starting in a batch re-renders its node's block with the earlier items' text.
    html = views.live_update(events[2:5], earlier=events[:2])
    assert boxes(html) == {"tokens-say": "", "tokens-say.0": "A ", "tokens-say.1": "Some "}
    assert views.live_history_needed(events[2:5])
    assert not views.live_history_needed(events[:5])  # the node's own start is in the batch
    # Chunks of a node that did not start in the batch are appended to their own item's box.
    html = views.live_update(events[5:7])
    assert html == (
        '<pre id="tokens-say.1" hx-swap-oob="beforeend">thoughts</pre>'
        '<pre id="tokens-say.0" hx-swap-oob="beforeend">brief</pre>'
    )
    # A loop's next iteration replaces the node's text.
    assert boxes(views.live_update(events[9:11])) == {"tokens-write": "second draft"}


async def test_runs_feed_rerenders_the_table_when_runs_start_and_finish(live: httpx.AsyncClient) -> None:
    run_id = await start_live(live, "pipeline", {"who": "ada"}, wait=True)

    def shows_it_finished(frame: Frame) -> bool:
        return f'<tr id="run-{run_id}" class="run status-succeeded">' in frame.data

    frames = await read_frames(live, "/ui/feed", params={"after": 0}, until=shows_it_finished)
    # Fragments show the current state: even the message for its start shows how it ended.
    assert frames[-1].event in ("workflow.started", "workflow.finished")
    assert (frames[-1].id or "").isdigit()
    assert frames[-1].data.startswith('<tbody id="runs-body" hx-swap-oob="true">')
    assert all(f.event in ("workflow.started", "workflow.finished") for f in frames)

    # Filters apply to the live table too.
    another = await start_live(live, "pipeline", {"who": "bo"}, wait=True)
    frames = await read_frames(
        live, "/ui/feed", params={"after": 0, "graph": "pipeline", "status": "failed"},
        until=lambda f: f.id == frames[-1].id or "runs-body" in f.data,
    )  # fmt: skip
    assert "runs-body" in frames[-1].data
    assert f"run-{another}" not in frames[-1].data
    assert f"run-{run_id}" not in frames[-1].data


# --- the diagram ------------------------------------------------------------------------------------


def test_diagram_places_nodes_left_to_right_by_longest_path() -> None:
    graph = build(LOOP)
    assert diagram.levels(graph) == {"plan": 0, "research": 1, "write": 2, "critic": 3, "publish": 4}
    plan = diagram.layout(graph)
    xs = [plan.boxes[n].x for n in ("plan", "research", "write", "critic", "publish")]
    assert xs == sorted(xs)
    assert len(set(xs)) == 5


def test_diagram_draws_parallel_nodes_in_one_column() -> None:
    graph = build("""
name: diamond
nodes: {a: {agent: template, template: a}, b: {agent: template, template: b},
        c: {agent: template, template: c}, d: {agent: template, template: d}}
edges: [{from: a, to: [b, c]}, {from: [b, c], to: d}]
""")
    plan = diagram.layout(graph)
    assert plan.boxes["b"].x == plan.boxes["c"].x
    assert plan.boxes["b"].y != plan.boxes["c"].y
    assert plan.levels == [["a"], ["b", "c"], ["d"]]


def test_diagram_draws_a_back_edge_as_a_loop_under_the_nodes() -> None:
    graph = build(LOOP)
    svg = diagram.render(graph)
    loops = re.findall(
        r'<path class="edge back conditional" d="([^"]+)"[^>]*data-source="critic" data-target="write"', svg
    )
    assert len(loops) == 1
    numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", loops[0])]
    lowest_node_bottom = max(b.y + diagram.NODE_HEIGHT for b in diagram.layout(graph).boxes.values())
    assert max(numbers[1::2]) > lowest_node_bottom  # the curve passes below every node
    assert svg.count('class="edge"') + svg.count('class="edge conditional"') == 5  # forward edges


def test_diagram_nodes_carry_their_id_and_status_class() -> None:
    from server.status import NodeStatus

    graph = build(LOOP)
    views = {
        "plan": diagram.NodeView(NodeStatus.SUCCEEDED),
        "write": diagram.NodeView(NodeStatus.RUNNING, "2 tries"),
    }
    svg = diagram.render(graph, views, {"plan": {"hx-get": "/x?a=1&b=2"}})
    assert '<g id="node-plan" class="node status-succeeded"' in svg
    assert '<g id="node-write" class="node status-running"' in svg
    assert '<g id="node-publish" class="node status-pending"' in svg
    assert 'hx-get="/x?a=1&amp;b=2"' in svg
    assert "2 tries" in svg


def test_diagram_view_box_holds_every_node_and_edge() -> None:
    """The SVG scales to its card by its viewBox: every node and every curve must lie inside it."""
    wide = build("""
name: wide
nodes: {a: {agent: template, template: a}, b: {agent: template, template: b},
        c: {agent: template, template: c}, d: {agent: template, template: d},
        e: {agent: template, template: e}}
edges: [{from: a, to: [b, c, d]}, {from: [b, c, d], to: e}, {from: e, to: a, when: "false"},
        {from: e, to: e, when: "false"}]
""")
    for graph in (build(LOOP), wide):
        svg = diagram.render(graph)
        found = re.search(r'<svg class="diagram"[^>]* viewBox="([^"]+)"', svg)
        assert found is not None
        left, top, width, height = (float(n) for n in found.group(1).split())
        assert (left, top) == (0, 0)
        # Scaled to the card's width, never beyond its own size nor below 70% of it (then it scrolls).
        assert f'style="max-width: {width:g}px; min-width: {width * 0.7:.0f}px"' in svg
        rects = re.findall(r'<rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)"', svg)
        assert len(rects) == len(graph.nodes)
        for x, y, w, h in ((float(v) for v in rect) for rect in rects):
            assert x > 0
            assert x + w < width
            assert y > 0
            assert y + h < height
        for d in re.findall(r'<path class="edge[^"]*" d="([^"]+)"', svg):
            # Each edge is one cubic curve: check the points along it.
            numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", d)]
            (x0, y0), (x1, y1), (x2, y2), (x3, y3) = zip(numbers[0::2], numbers[1::2], strict=True)
            for t in (i / 20 for i in range(21)):
                x = (1 - t) ** 3 * x0 + 3 * (1 - t) ** 2 * t * x1 + 3 * (1 - t) * t**2 * x2 + t**3 * x3
                y = (1 - t) ** 3 * y0 + 3 * (1 - t) ** 2 * t * y1 + 3 * (1 - t) * t**2 * y2 + t**3 * y3
                assert 0 <= x <= width, d
                assert 0 <= y <= height - diagram.PAD / 2, d
