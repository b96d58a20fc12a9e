"""The dashboard's pages, fragments and live feeds (through the app), and the graph diagram."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import yaml
from litestar.testing import AsyncTestClient

from agents.registry import default_registry
from server.config import Settings
from server.graph.fields import ValidationContext
from server.graph.model import Graph
from server.graph.parse import build_graph
from server.web import diagram
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
    assert re.search(r'<pre id="tokens-write" class="tokens" hx-swap-oob="true">[^<]*</pre>', html)

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
