"""A crash never leaves a run "running": the embedded server resumes unfinished runs when it
starts again, without executing completed nodes a second time."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tests.server_process import start_server

GRAPH = {
    "name": "crashy",
    "nodes": {
        "first": {"agent": "template", "value": "'done'"},
        "slow": {"agent": "wait", "seconds": 2},
        "last": {"agent": "template", "template": "after {{ outputs.first }}"},
    },
    "edges": [{"from": "first", "to": "slow"}, {"from": "slow", "to": "last"}],
    "output": "outputs['last']",
}


def poll(client: httpx.Client, run_id: str, until: Any, within: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        run = client.get(f"/runs/{run_id}").json()
        if until(run):
            return run
        assert time.monotonic() < deadline, f"run never got there: {run}"
        time.sleep(0.05)


def test_a_run_interrupted_by_a_crash_is_resumed_at_the_next_start(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            assert client.post("/graphs", json=GRAPH).status_code == 201
            run_id = client.post("/graphs/crashy/runs", json={"input": {}}).json()["id"]
            poll(
                client,
                run_id,
                lambda r: ("slow", "running") in {(n["node"], n["status"]) for n in r["nodes"]},
            )
        server.process.kill()  # kill -9: no shutdown, no cleanup
        server.process.wait()

        server.restart()
        with httpx.Client(base_url=server.url, timeout=10) as client:
            run = poll(client, run_id, lambda r: r["status"] not in ("queued", "running"))
            assert run["status"] == "succeeded", run
            assert run["output"] == "after done"
            events = client.get(f"/runs/{run_id}/events", headers={"Accept": "application/json"}).json()
    finally:
        server.stop()

    assert [e["id"] for e in events] == list(range(1, len(events) + 1)), "gapless, no duplicates"
    completed = Counter(e["node"] for e in events if e["type"] == "node.completed")
    assert completed == {"first": 1, "slow": 1, "last": 1}
    started = Counter(e["node"] for e in events if e["type"] == "node.started")
    assert started["first"] == 1, "a completed node is not executed again"
    assert started["slow"] == 2, "the node in flight at the crash runs again (at-least-once)"
    assert [e["type"] for e in events].count("workflow.started") == 1
    assert events[-1]["type"] == "workflow.finished"
