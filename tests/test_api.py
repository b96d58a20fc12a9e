"""The HTTP API as a client sees it: every endpoint, every error code (DESIGN.md, "HTTP API")."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import pytest
import yaml
from litestar.testing import AsyncTestClient

from server.config import Settings
from tests.conftest import SettingsFactory

pytestmark = pytest.mark.anyio

Client = AsyncTestClient[Any]

HELLO: dict[str, Any] = {
    "name": "hello",
    "description": "Greets a topic twice.",
    "input": {"type": "object", "required": ["topic"], "properties": {"topic": {"type": "string"}}},
    "nodes": {
        "greet": {"agent": "template", "template": "Hello {{ input.topic }}"},
        "shout": {"agent": "template", "template": "{{ outputs.greet }}!"},
    },
    "edges": [{"from": "greet", "to": "shout"}],
    "output": "outputs.shout",
}

HELLO_YAML = """\
name: hello-yaml
description: The same, in YAML.
nodes:
  greet:
    agent: template
    template: "Hi {{ input.who }}"
output: outputs.greet
"""

SLEEPY: dict[str, Any] = {
    "name": "sleepy",
    "nodes": {"nap": {"agent": "wait", "seconds": 30}},
}


def graph(name: str, text: str = "ok") -> dict[str, Any]:
    return {
        "name": name,
        "nodes": {"only": {"agent": "template", "template": text}},
        "output": "outputs.only",
    }


async def poll_run(client: Client, run_id: str, done: Any, within: float = 5.0) -> dict[str, Any]:
    """GET the run until ``done(run)`` holds; fails with the last state after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        run = (await client.get(f"/runs/{run_id}")).json()
        if done(run):
            return run
        assert time.monotonic() < deadline, f"run never reached the expected state: {run}"
        await anyio.sleep(0.01)  # the poll interval; the deadline above bounds the wait


def problem_paths(response: Any) -> list[str]:
    body = response.json()
    assert body["status_code"] == 422
    assert isinstance(body["detail"], str)
    assert body["detail"]
    return [p["path"] for p in body["errors"]]


# --- graphs -----------------------------------------------------------------------------------


async def test_create_graph_answers_201_with_version_1(client: Client) -> None:
    response = await client.post("/graphs", json=HELLO)
    assert response.status_code == 201
    body = response.json()
    assert body["name"] == "hello"
    assert body["version"] == 1
    assert body["description"] == "Greets a topic twice."
    assert body["nodes"] == 2
    assert body["spec"] == HELLO
    assert body["created_at"]

    stored = (await client.get("/graphs/hello")).json()
    assert stored["spec"] == HELLO
    assert stored["version"] == 1


async def test_create_existing_name_is_409(client: Client) -> None:
    assert (await client.post("/graphs", json=HELLO)).status_code == 201
    response = await client.post("/graphs", json=HELLO)
    assert response.status_code == 409
    assert response.json()["status_code"] == 409
    assert "hello" in response.json()["detail"]


async def test_invalid_graph_is_422_listing_every_problem(client: Client) -> None:
    bad = {
        "name": "Bad Name!",
        "nodes": {
            "a": {"agent": "no-such-kind"},
            "b": {"agent": "template", "template": "{{ unclosed"},
        },
        "edges": [{"from": "a", "to": "ghost"}],
    }
    response = await client.post("/graphs", json=bad)
    assert response.status_code == 422
    paths = problem_paths(response)
    assert "name" in paths
    assert any(p.startswith("nodes.a") for p in paths), paths
    assert any(p.startswith("nodes.b") for p in paths), paths
    assert any(p.startswith("edges") for p in paths), paths
    assert (await client.get("/graphs")).json() == []


async def test_graph_body_may_be_yaml(client: Client) -> None:
    response = await client.post("/graphs", content=HELLO_YAML, headers={"Content-Type": "application/yaml"})
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "hello-yaml"
    assert response.json()["spec"] == yaml.safe_load(HELLO_YAML)

    response = await client.put(
        "/graphs/hello-yaml", content=HELLO_YAML.replace("Hi", "Hey"), headers={"Content-Type": "text/yaml"}
    )
    assert response.status_code == 200
    assert response.json()["version"] == 2


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        ('{"name": "x", "nodes": ', "application/json"),
        ("name: [unclosed", "application/yaml"),
        ("", "application/json"),
        ("\xff\xfe", "application/json"),
    ],
)
async def test_malformed_graph_body_is_400(client: Client, content: str, content_type: str) -> None:
    response = await client.post(
        "/graphs", content=content.encode("latin-1"), headers={"Content-Type": content_type}
    )
    assert response.status_code == 400, response.text
    assert response.json()["status_code"] == 400
    assert response.json()["detail"]


async def test_graph_body_that_is_not_an_object_is_rejected(client: Client) -> None:
    response = await client.post("/graphs", json=["a", "list"])
    assert response.status_code in (400, 422)
    assert response.json()["status_code"] == response.status_code


async def test_oversize_body_is_413(make_settings: SettingsFactory) -> None:
    from server.api.app import create_app

    async with AsyncTestClient(app=create_app(make_settings(max_body_bytes=2048))) as small:
        huge = graph("huge", "x" * 4096)
        response = await small.post("/graphs", json=huge)
        assert response.status_code == 413
        assert response.json()["status_code"] == 413
        response = await small.post("/graphs/huge/runs", json={"input": {"blob": "x" * 4096}})
        assert response.status_code == 413
        assert (await small.post("/graphs", json=graph("small"))).status_code == 201


async def test_put_creates_then_stores_new_versions(client: Client) -> None:
    response = await client.put("/graphs/versioned", json=graph("versioned", "one"))
    assert response.status_code == 201
    assert response.json()["version"] == 1

    response = await client.put("/graphs/versioned", json=graph("versioned", "two"))
    assert response.status_code == 200
    assert response.json()["version"] == 2

    # The name may be left out of the body: the URL names the graph.
    unnamed = {k: v for k, v in graph("versioned", "three").items() if k != "name"}
    response = await client.put("/graphs/versioned", json=unnamed)
    assert response.status_code == 200
    assert response.json()["version"] == 3
    assert response.json()["spec"]["name"] == "versioned"

    versions = (await client.get("/graphs/versioned/versions")).json()
    assert [v["version"] for v in versions] == [3, 2, 1]
    old = (await client.get("/graphs/versioned", params={"version": 1})).json()
    assert old["version"] == 1
    assert old["spec"]["nodes"]["only"]["template"] == "one"
    latest = (await client.get("/graphs/versioned")).json()
    assert latest["version"] == 3
    assert latest["spec"]["nodes"]["only"]["template"] == "three"


async def test_put_with_another_name_in_the_body_is_422_at_name(client: Client) -> None:
    response = await client.put("/graphs/alpha", json=graph("beta"))
    assert response.status_code == 422
    assert problem_paths(response) == ["name"]
    assert (await client.get("/graphs/alpha")).status_code == 404
    assert (await client.get("/graphs/beta")).status_code == 404


async def test_validate_does_not_store(client: Client) -> None:
    response = await client.post("/graphs/validate", json=HELLO)
    assert response.status_code == 200
    assert response.json() == {"valid": True, "name": "hello", "nodes": 2}
    assert (await client.get("/graphs/hello")).status_code == 404

    bad = {**HELLO, "nodes": {"greet": {"agent": "template", "template": "x", "bogus": 1}}}
    response = await client.post("/graphs/validate", json=bad)
    assert response.status_code == 422
    assert any(p.startswith("nodes.greet") for p in problem_paths(response))


async def test_graphs_up_to_the_size_limit_validate_and_larger_ones_are_422(client: Client) -> None:
    from server.graph.parse import MAX_NODES

    nodes = {
        f"n{i}": {"agent": "template", "template": f"step {i} of {{{{ input }}}}"} for i in range(MAX_NODES)
    }
    edges = [{"from": f"n{i}", "to": f"n{i + 1}"} for i in range(MAX_NODES - 1)]
    response = await client.post("/graphs/validate", json={"name": "big", "nodes": nodes, "edges": edges})
    assert response.json() == {"valid": True, "name": "big", "nodes": MAX_NODES}

    too_many = {f"n{i}": {"agent": "template", "template": "x"} for i in range(MAX_NODES + 1)}
    response = await client.post("/graphs/validate", json={"name": "bigger", "nodes": too_many})
    assert response.status_code == 422
    assert problem_paths(response) == ["nodes"]


async def test_get_graph_versions_and_errors(client: Client) -> None:
    await client.post("/graphs", json=HELLO)
    assert (await client.get("/graphs/hello", params={"version": 9})).status_code == 404
    assert (await client.get("/graphs/nope")).status_code == 404
    assert (await client.get("/graphs/nope")).json()["status_code"] == 404
    response = await client.get("/graphs/hello", params={"version": "latest"})
    assert response.status_code == 422
    assert problem_paths(response) == ["version"]
    assert (await client.get("/graphs/nope/versions")).status_code == 404


async def test_get_graph_as_yaml(client: Client) -> None:
    await client.post("/graphs", json=HELLO)
    response = await client.get("/graphs/hello", headers={"Accept": "application/yaml"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/yaml")
    assert yaml.safe_load(response.text) == HELLO
    assert response.text.startswith("name: hello")  # the keys in the order submitted


async def test_list_graphs_with_last_run(client: Client) -> None:
    assert (await client.get("/graphs")).json() == []
    await client.post("/graphs", json=HELLO)
    await client.post("/graphs", json=graph("other"))
    await client.put("/graphs/other", json=graph("other", "v2"))
    run = (
        await client.post("/graphs/hello/runs", params={"wait": "true"}, json={"input": {"topic": "x"}})
    ).json()

    listed = {g["name"]: g for g in (await client.get("/graphs")).json()}
    assert set(listed) == {"hello", "other"}
    assert listed["other"]["version"] == 2
    assert listed["other"]["nodes"] == 1
    assert listed["other"]["last_run"] is None
    assert listed["hello"]["description"] == "Greets a topic twice."
    assert listed["hello"]["nodes"] == 2
    last = listed["hello"]["last_run"]
    assert last["id"] == run["id"]
    assert last["status"] == "succeeded"
    assert last["finished_at"]


async def test_delete_graph_keeps_its_runs(client: Client) -> None:
    await client.post("/graphs", json=HELLO)
    run = (
        await client.post("/graphs/hello/runs", params={"wait": "true"}, json={"input": {"topic": "x"}})
    ).json()
    response = await client.delete("/graphs/hello")
    assert response.status_code == 204
    assert response.content == b""
    assert (await client.get("/graphs/hello")).status_code == 404
    assert (await client.delete("/graphs/hello")).status_code == 404
    kept = await client.get(f"/runs/{run['id']}")
    assert kept.status_code == 200
    assert kept.json()["status"] == "succeeded"
    nodes = [(n["node"], n["status"]) for n in kept.json()["nodes"]]
    assert nodes == [("greet", "succeeded"), ("shout", "succeeded")]
    assert (await client.post("/graphs/hello/runs", json={"input": {"topic": "x"}})).status_code == 404


async def test_a_graph_deleted_and_created_again_runs_its_new_spec(client: Client) -> None:
    await client.post("/graphs", json=graph("again", "first"))
    run = await client.post("/graphs/again/runs", params={"wait": "true"}, json={"input": {}})
    assert run.json()["output"] == "first"
    assert (await client.delete("/graphs/again")).status_code == 204
    created = await client.post("/graphs", json=graph("again", "second"))
    assert created.json()["version"] == 1
    run = await client.post("/graphs/again/runs", params={"wait": "true"}, json={"input": {}})
    assert run.json()["output"] == "second"


# --- runs -------------------------------------------------------------------------------------


async def test_start_run_is_202_queued(client: Client) -> None:
    await client.post("/graphs", json=HELLO)
    response = await client.post("/graphs/hello/runs", json={"input": {"topic": "braids"}})
    assert response.status_code == 202
    run = response.json()
    assert run["status"] == "queued"
    assert run["graph"] == "hello"
    assert run["version"] == 1
    assert run["input"] == {"topic": "braids"}
    assert "Idempotent-Replayed" not in response.headers
    # Every node of the graph is listed from the start, ``pending`` until it executes.
    assert [(n["node"], n["status"], n["attempts"]) for n in run["nodes"]] == [
        ("greet", "pending", 0),
        ("shout", "pending", 0),
    ]
    done = await poll_run(client, run["id"], lambda r: r["status"] == "succeeded")
    assert done["output"] == "Hello braids!"
    nodes = [(n["node"], n["status"]) for n in done["nodes"]]
    assert nodes == [("greet", "succeeded"), ("shout", "succeeded")]


async def test_a_running_run_lists_the_nodes_it_has_not_reached_as_pending(client: Client) -> None:
    spec = {
        "name": "nap-then-greet",
        "nodes": {"nap": {"agent": "wait", "seconds": 30}, "greet": {"agent": "template", "template": "hi"}},
        "edges": [{"from": "nap", "to": "greet"}],
    }
    await client.post("/graphs", json=spec)
    run = (await client.post("/graphs/nap-then-greet/runs", json={})).json()
    running = await poll_run(client, run["id"], lambda r: r["nodes"][0]["status"] == "running")
    assert [(n["node"], n["status"]) for n in running["nodes"]] == [("nap", "running"), ("greet", "pending")]
    greet = running["nodes"][1]
    assert greet["started_at"] is None
    assert greet["output"] is None
    assert greet["usage"] == {}
    await client.post(f"/runs/{run['id']}/cancel")
    cancelled = await poll_run(client, run["id"], lambda r: r["status"] == "cancelled")
    nodes = [(n["node"], n["status"]) for n in cancelled["nodes"]]
    assert nodes == [("nap", "cancelled"), ("greet", "pending")]


async def test_run_body_may_be_empty(client: Client) -> None:
    await client.post("/graphs", json=graph("plain"))
    response = await client.post("/graphs/plain/runs")
    assert response.status_code == 202
    assert response.json()["input"] == {}


async def test_run_input_failing_the_schema_is_422_at_its_path(client: Client) -> None:
    await client.post("/graphs", json=HELLO)
    response = await client.post("/graphs/hello/runs", json={"input": {}})
    assert response.status_code == 422
    assert problem_paths(response) in (["input"], ["input.topic"])
    assert "topic" in response.json()["errors"][0]["message"]
    response = await client.post("/graphs/hello/runs", json={"input": {"topic": 42}})
    assert response.status_code == 422
    assert problem_paths(response) == ["input.topic"]
    assert (await client.get("/runs")).json()["items"] == []


async def test_bad_run_requests(client: Client) -> None:
    await client.post("/graphs", json=HELLO)
    url = "/graphs/hello/runs"
    malformed = await client.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
    assert malformed.status_code == 400
    assert (await client.post(url, json=[1, 2])).status_code == 400
    response = await client.post(url, json={"input": {"topic": "x"}, "version": "one", "colour": "red"})
    assert response.status_code == 422
    assert sorted(problem_paths(response)) == ["colour", "version"]
    response = await client.post(url, params={"wait": "maybe"}, json={"input": {"topic": "x"}})
    assert problem_paths(response) == ["wait"]
    response = await client.post(
        url, params={"wait": "true", "timeout": "9999"}, json={"input": {"topic": "x"}}
    )
    assert problem_paths(response) == ["timeout"]
    assert (await client.post("/graphs/nope/runs", json={})).status_code == 404
    assert (await client.post(url, json={"input": {"topic": "x"}, "version": 7})).status_code == 404


async def test_same_idempotency_key_returns_the_first_run(client: Client) -> None:
    await client.post("/graphs", json=HELLO)
    body = {"input": {"topic": "once"}, "idempotency_key": "order-17"}
    first = await client.post("/graphs/hello/runs", json=body)
    again = await client.post("/graphs/hello/runs", json=body)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert len((await client.get("/runs")).json()["items"]) == 1


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize("levels", [101, 950, 5_000])
async def test_a_run_body_nested_too_deeply_is_400(client: Client, levels: int) -> None:
    await client.post("/graphs", json=graph("plain"))
    json_type = {"Content-Type": "application/json"}
    for body in (nested(levels), '{"input": ' + nested(levels - 1) + "}"):
        response = await client.post("/graphs/plain/runs", content=body.encode(), headers=json_type)
        assert response.status_code == 400, response.text
        assert response.json() == {
            "status_code": 400,
            "detail": "the request body is nested too deeply (over 100 levels)",
        }
    assert (await client.get("/runs")).json()["items"] == []


async def test_a_run_input_nested_99_levels_is_stored_and_read_back(client: Client) -> None:
    await client.post("/graphs", json=graph("plain"))
    body = '{"input": ' + nested(99) + "}"
    response = await client.post(
        "/graphs/plain/runs", content=body.encode(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 202, response.text
    run = await poll_run(client, response.json()["id"], lambda r: r["status"] == "succeeded")
    assert run["input"] == json.loads(nested(99))
    assert (await client.get("/runs")).status_code == 200


@pytest.mark.parametrize("levels", [101, 950, 5_000])
async def test_a_graph_nested_too_deeply_is_400(client: Client, levels: int) -> None:
    spec = '{"name": "deep", "input": {"type": "object", "default": %s}, "nodes": {}}'
    for body, content_type in (
        (spec.replace("%s", nested(levels)), "application/json"),
        ("name: deep\ninput:\n  default: " + nested(levels) + "\n", "application/yaml"),
    ):
        response = await client.post("/graphs", content=body.encode(), headers={"Content-Type": content_type})
        assert response.status_code == 400, response.text
        assert "nested too deeply" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "paths"),
    [
        (b'{"input": {"x": NaN}}', ["input.x"]),
        (b'{"input": {"x": [1, Infinity, -Infinity]}}', ["input.x[1]", "input.x[2]"]),
        (b'{"input": {"s": "\\ud800"}}', ["input.s"]),
        (b'{"input": NaN}', ["input"]),
        (b'{"input": {"topic": "t"}, "idempotency_key": "k\\udfff"}', ["idempotency_key"]),
    ],
)
async def test_a_run_input_that_is_not_plain_json_is_422_with_its_path(
    client: Client, body: bytes, paths: list[str]
) -> None:
    await client.post("/graphs", json=graph("plain"))
    response = await client.post(
        "/graphs/plain/runs", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert problem_paths(response) == paths
    assert (await client.get("/runs")).json()["items"] == []


async def test_idempotency_key_header_works_like_the_body_field(client: Client) -> None:
    await client.post("/graphs", json=HELLO)
    url, body = "/graphs/hello/runs", {"input": {"topic": "once"}}
    first = await client.post(url, json=body, headers={"Idempotency-Key": "order-18"})
    assert first.status_code == 202
    assert "Idempotent-Replayed" not in first.headers
    again = await client.post(url, json=body, headers={"Idempotency-Key": "order-18"})
    by_field = await client.post(url, json={**body, "idempotency_key": "order-18"})
    both = await client.post(
        url, json={**body, "idempotency_key": "order-18"}, headers={"Idempotency-Key": "order-18"}
    )
    for replay in (again, by_field, both):
        assert replay.status_code == 202
        assert replay.json()["id"] == first.json()["id"]
        assert replay.headers["Idempotent-Replayed"] == "true"

    differ = await client.post(
        url, json={**body, "idempotency_key": "order-19"}, headers={"Idempotency-Key": "order-18"}
    )
    assert differ.status_code == 422
    assert problem_paths(differ) == ["idempotency_key"]
    too_long = await client.post(url, json=body, headers={"Idempotency-Key": "k" * 201})
    assert problem_paths(too_long) == ["Idempotency-Key"]
    assert len((await client.get("/runs")).json()["items"]) == 1


async def test_wait_true_answers_200_when_the_run_ended(client: Client) -> None:
    await client.post("/graphs", json=HELLO)
    response = await client.post(
        "/graphs/hello/runs", params={"wait": "true"}, json={"input": {"topic": "x"}}
    )
    assert response.status_code == 200
    run = response.json()
    assert run["status"] == "succeeded"
    assert run["output"] == "Hello x!"
    assert run["finished_at"]
    assert [n["node"] for n in run["nodes"]] == ["greet", "shout"]
    # Usage reads the same here as in node.completed: {} for a node that used no model.
    assert [n["usage"] for n in run["nodes"]] == [{}, {}]
    events = (await client.get(f"/runs/{run['id']}/events", headers={"Accept": "application/json"})).json()
    assert [e["usage"] for e in events if e["type"] == "node.completed"] == [{}, {}]


async def test_wait_true_times_out_with_202(client: Client) -> None:
    await client.post("/graphs", json=SLEEPY)
    response = await client.post("/graphs/sleepy/runs", params={"wait": "true", "timeout": "0.2"})
    assert response.status_code == 202
    assert response.json()["status"] in ("queued", "running")
    assert (await client.post(f"/runs/{response.json()['id']}/cancel")).status_code == 202


async def test_list_runs_filters_and_pages(client: Client) -> None:
    await client.post("/graphs", json=HELLO)
    await client.post("/graphs", json=graph("plain"))
    ids = []
    for topic in ("a", "b", "c"):
        run = await client.post(
            "/graphs/hello/runs", params={"wait": "true"}, json={"input": {"topic": topic}}
        )
        ids.append(run.json()["id"])
    plain = (await client.post("/graphs/plain/runs", params={"wait": "true"})).json()

    everything = (await client.get("/runs")).json()
    assert [r["id"] for r in everything["items"]] == [plain["id"], *reversed(ids)]
    assert everything["next"] is None
    summary = everything["items"][0]
    assert summary["graph"] == "plain"
    assert summary["status"] == "succeeded"
    assert summary["created_at"]

    hello = (await client.get("/runs", params={"graph": "hello"})).json()
    assert [r["id"] for r in hello["items"]] == list(reversed(ids))
    assert (await client.get("/runs", params={"status": "failed"})).json()["items"] == []
    assert len((await client.get("/runs", params={"status": "succeeded"})).json()["items"]) == 4

    page = (await client.get("/runs", params={"limit": 2})).json()
    assert [r["id"] for r in page["items"]] == [plain["id"], ids[2]]
    assert page["next"]
    rest = (await client.get("/runs", params={"limit": 2, "before": page["next"]})).json()
    assert [r["id"] for r in rest["items"]] == [ids[1], ids[0]]

    bad_status = await client.get("/runs", params={"status": "finished"})
    assert bad_status.status_code == 422
    assert problem_paths(bad_status) == ["status"]
    for limit in ("0", "501", "many"):
        response = await client.get("/runs", params={"limit": limit})
        assert response.status_code == 422
        assert problem_paths(response) == ["limit"]


@pytest.mark.parametrize(
    "before",
    [
        "garbage",
        "0",
        "';drop",
        "00000000-0000-0000-0000-000000000000",
        "9b2f4c1e-8a1d-4e7b-9f3a-2c5d6e7f8a9b",  # a UUID, but version 4
        "{0190a5c4-7d2e-7b3f-8a4c-5d6e7f8a9b0c}",  # a UUIDv7, but not as the server spells it
        "0190A5C4-7D2E-7B3F-8A4C-5D6E7F8A9B0C",
    ],
)
async def test_list_runs_before_must_be_a_run_id(client: Client, before: str) -> None:
    response = await client.get("/runs", params={"before": before})
    assert response.status_code == 422, response.text
    assert problem_paths(response) == ["before"]


async def test_list_runs_before_a_run_id_it_never_handed_out_is_fine(client: Client) -> None:
    response = await client.get("/runs", params={"before": "0190a5c4-7d2e-7b3f-8a4c-5d6e7f8a9b0c"})
    assert response.status_code == 200
    assert response.json() == {"items": [], "next": None}


@pytest.mark.parametrize(
    ("params", "headers", "path"),
    [
        ({"after": "-1"}, {}, "after"),
        ({"after": "abc"}, {}, "after"),
        ({"after": "99999999999999999999"}, {}, "after"),
        ({}, {"Last-Event-ID": "xyz"}, "Last-Event-ID"),
        ({}, {"Last-Event-ID": "-3"}, "Last-Event-ID"),
    ],
)
async def test_bad_event_cursors_are_422_naming_them(
    client: Client, params: dict[str, str], headers: dict[str, str], path: str
) -> None:
    await client.post("/graphs", json=graph("plain"))
    run = (await client.post("/graphs/plain/runs", params={"wait": "true"})).json()
    # Only error answers here: the test client cannot read a stream that does not end.
    for accept in ("application/json", "text/event-stream"):
        response = await client.get(
            f"/runs/{run['id']}/events", params=params, headers={**headers, "Accept": accept}
        )
        assert response.status_code == 422, response.text
        assert problem_paths(response) == [path]
    response = await client.get("/events", params=params, headers=headers)
    assert response.status_code == 422, response.text
    assert problem_paths(response) == [path]


@pytest.mark.parametrize(
    ("params", "path"),
    [
        ({"deltas": "maybe"}, "deltas"),
        ({"replay": "-5"}, "replay"),
        ({"replay": "lots"}, "replay"),
    ],
)
async def test_bad_feed_parameters_are_422_naming_them(
    client: Client, params: dict[str, str], path: str
) -> None:
    response = await client.get("/events", params=params)
    assert response.status_code == 422, response.text
    assert problem_paths(response) == [path]
    assert "extra" not in response.json()


async def test_get_run_with_its_nodes(client: Client) -> None:
    await client.post("/graphs", json=HELLO)
    started = (
        await client.post("/graphs/hello/runs", params={"wait": "true"}, json={"input": {"topic": "x"}})
    ).json()
    response = await client.get(f"/runs/{started['id']}")
    assert response.status_code == 200
    run = response.json()
    for key in ("id", "graph", "version", "status", "input", "output", "error", "created_at", "started_at"):
        assert key in run
    assert run["duration_ms"] >= 0
    assert isinstance(run["usage"], dict)
    nodes = {n["node"]: n for n in run["nodes"]}
    assert set(nodes) == {"greet", "shout"}
    greet = nodes["greet"]
    assert greet["status"] == "succeeded"
    assert greet["output"] == "Hello x"
    assert greet["attempts"] == 1
    assert greet["iteration"] == 0
    assert greet["duration_ms"] >= 0
    assert greet["started_at"]
    assert greet["finished_at"]
    assert (await client.get("/runs/no-such-run")).status_code == 404


async def test_cancel_a_running_run(client: Client) -> None:
    await client.post("/graphs", json=SLEEPY)
    run = (await client.post("/graphs/sleepy/runs")).json()
    await poll_run(client, run["id"], lambda r: r["status"] == "running")

    response = await client.post(f"/runs/{run['id']}/cancel")
    assert response.status_code == 202
    assert response.json()["id"] == run["id"]
    cancelled = await poll_run(client, run["id"], lambda r: r["status"] == "cancelled", within=1.0)
    assert cancelled["finished_at"]

    again = await client.post(f"/runs/{run['id']}/cancel")
    assert again.status_code == 409
    assert again.json()["status_code"] == 409
    assert (await client.post("/runs/no-such-run/cancel")).status_code == 404


# --- health and docs --------------------------------------------------------------------------


async def test_health(client: Client, settings: Settings) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "database": "ok",
        "queue": "ok",
        "mode": "embedded",
        "model": "mock",
    }


async def test_health_is_503_when_the_database_is_down(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def down() -> bool:
        raise ConnectionError("database unreachable")

    monkeypatch.setattr(client.app.state.braid.store, "ping", down)
    response = await client.get("/health")
    assert response.status_code == 503
    assert response.json()["status"] == "degraded"
    assert response.json()["database"] == "down"
    assert response.json()["queue"] == "ok"


async def test_openapi_schema_and_docs(client: Client) -> None:
    schema = (await client.get("/schema/openapi.json")).json()
    for path in ("/graphs", "/graphs/{name}", "/graphs/{name}/runs", "/runs", "/runs/{run_id}", "/health"):
        assert path in schema["paths"], sorted(schema["paths"])
    docs = await client.get("/schema/swagger")
    assert docs.status_code == 200
    assert "text/html" in docs.headers["content-type"]


async def test_unexpected_errors_are_a_generic_500(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken() -> list[Any]:
        raise RuntimeError("secret connection string postgres://user:pw@db")

    monkeypatch.setattr(client.app.state.braid.store, "list_graphs", broken)
    response = await client.get("/graphs")
    assert response.status_code == 500
    assert response.json()["status_code"] == 500
    assert "secret" not in response.text
    assert "Traceback" not in response.text


async def test_unknown_route_is_a_json_404(client: Client) -> None:
    response = await client.get("/nowhere")
    assert response.status_code == 404
    assert response.json()["status_code"] == 404
