"""`braid serve` as a user runs it: a real process, the examples loaded, a run end to end, SIGTERM."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import pytest
import yaml

from server import collector
from server.cli import sse_frames
from tests.conftest import EXAMPLES_DIR, Served, serve_env, start_serve
from tests.services import require_postgres, require_redis


def example_specs() -> dict[str, dict[str, Any]]:
    specs: dict[str, dict[str, Any]] = {}
    for path in sorted([*EXAMPLES_DIR.glob("*.yaml"), *EXAMPLES_DIR.glob("*.yml")]):
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        specs[spec["name"]] = spec
    return specs


def sample(schema: dict[str, Any] | None) -> Any:
    """A value satisfying a simple JSON Schema (what a user would type as the run input)."""
    if not schema:
        return {}
    if "default" in schema:
        return schema["default"]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object")
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: sample(properties.get(name, {"type": "string"})) for name in schema.get("required", [])}
    if kind == "array":
        return [sample(schema.get("items", {"type": "string"}))] * int(schema.get("minItems", 1))
    return {"string": "braided rivers", "integer": 2, "number": 2, "boolean": True}.get(str(kind), "x")


def uses_http(spec: dict[str, Any]) -> bool:
    return any(node.get("agent") == "http" for node in spec.get("nodes", {}).values())


def test_start_a_run_and_stream_its_events(served: Served) -> None:
    name = f"streamed-{uuid.uuid4().hex[:8]}"
    spec = {"name": name, "nodes": {"only": {"agent": "template", "template": "hi {{ input.who }}"}}}
    assert httpx.put(f"{served.url}/graphs/{name}", json=spec).status_code == 201
    with (
        httpx.Client(base_url=served.url, timeout=30) as http,
        http.stream(
            "POST",
            f"/graphs/{name}/runs",
            json={"input": {"who": "sse"}},
            headers={"Accept": "text/event-stream"},
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = list(sse_frames(response.iter_lines()))
    kinds = [f.event for f in frames]
    assert kinds[0] == "workflow.started"
    assert kinds[-1] == "workflow.finished"
    assert [f.id for f in frames] == [str(n) for n in range(1, len(frames) + 1)]
    finished = json.loads(frames[-1].data)
    assert finished["status"] == "succeeded"
    assert finished["output"] == "hi sse"


def test_serve_loads_the_examples_runs_one_and_stops_on_sigterm(tmp_path: Path) -> None:
    examples = example_specs()
    assert examples, "examples/ holds no graphs"
    served = start_serve(tmp_path)
    try:
        first_line = served.log().splitlines()[0]
        assert first_line.startswith(f"Braid on {served.url} (embedded, SQLite ")
        assert "mock model" in first_line
        # uvicorn's notices are the host's, once each: the in-process mock model's server neither
        # repeats them nor, with its log level, silences them (these lines went missing).
        notices = [line for line in served.log().splitlines() if line.startswith("INFO:     ")]
        assert notices == [
            f"INFO:     Started server process [{served.process.pid}]",
            "INFO:     Waiting for application startup.",
            "INFO:     Application startup complete.",
            f"INFO:     Uvicorn running on {served.url} (Press CTRL+C to quit)",
        ], served.log()

        with httpx.Client(base_url=served.url, timeout=60) as http:
            health = http.get("/health").json()
            assert health["status"] == "ok"
            assert health["mode"] == "embedded"
            assert health["model"] == "mock"

            listed = {g["name"]: g for g in http.get("/graphs").json()}
            assert set(examples) <= set(listed)
            for name, spec in examples.items():
                assert listed[name]["nodes"] == len(spec["nodes"])

            name, spec = next((n, s) for n, s in examples.items() if not uses_http(s))
            response = http.post(
                f"/graphs/{name}/runs",
                params={"wait": "true", "timeout": "60"},
                json={"input": sample(spec.get("input"))},
            )
            assert response.status_code == 200, response.text
            run = response.json()
            assert run["status"] == "succeeded", run
            assert run["output"] not in (None, "", [], {})
            assert {n["node"] for n in run["nodes"]} <= set(spec["nodes"])
    finally:
        began = time.monotonic()
        code = served.stop(within=10)
    assert code == 0, served.log()[-3000:]
    assert time.monotonic() - began < 10


def test_serve_keeps_what_it_opened_out_of_the_garbage_collector(tmp_path: Path) -> None:
    """A full collection pausing a burst of runs for tens of milliseconds to walk the app and
    the open Braid is what ``server.collector`` prevents: both are frozen once the app started,
    and young collections come every ``YOUNG_THRESHOLD`` new containers."""
    served = start_serve(tmp_path, {"BRAID_DEBUG": "1"})
    try:
        state = httpx.get(f"{served.url}/debug/collector", timeout=30).json()
    finally:
        served.stop(within=10)
    assert state == {"young_threshold": collector.YOUNG_THRESHOLD, "braid_frozen": True}


@contextmanager
def fresh_postgres() -> Generator[str]:
    """A new, empty Postgres database for this test, dropped afterwards."""
    url = require_postgres()
    server, _ = url.rsplit("/", 1)
    name = f"braid_serve_{secrets.token_hex(6)}"
    admin = f"{server.replace('postgresql+asyncpg://', 'postgresql://')}/postgres"

    async def execute(statement: str) -> None:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    anyio.run(execute, f'CREATE DATABASE "{name}"')
    try:
        yield f"{server}/{name}"
    finally:
        anyio.run(execute, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.postgres
@pytest.mark.redis
def test_distributed_serve_and_worker(tmp_path: Path) -> None:
    """`braid serve` (no workers in distributed mode) and `braid worker`, as compose runs them."""
    redis_base = require_redis().rsplit("/", 1)[0]
    redis_url = f"{redis_base}/{secrets.randbelow(14) + 2}"  # a database of its own, most likely
    with fresh_postgres() as database_url:
        env = {"BRAID_DATABASE_URL": database_url, "BRAID_REDIS_URL": redis_url}
        served = start_serve(tmp_path / "api", env)
        worker_log = tmp_path / "worker.log"
        with worker_log.open("wb") as log_file:
            worker = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "worker"],
                cwd=tmp_path,
                env=serve_env(tmp_path, 0, **env),
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            assert (
                served.log()
                .splitlines()[0]
                .startswith(f"Braid on {served.url} (distributed, no workers, PostgreSQL")
            )
            health = httpx.get(f"{served.url}/health").json()
            assert health == {
                "status": "ok",
                "database": "ok",
                "queue": "ok",
                "mode": "distributed",
                "model": "mock",
            }
            spec = {
                "name": "remote",
                "nodes": {"only": {"agent": "template", "template": "done by {{ input.who }}"}},
            }
            assert httpx.put(f"{served.url}/graphs/remote", json=spec).status_code == 201
            response = httpx.post(
                f"{served.url}/graphs/remote/runs",
                params={"wait": "true", "timeout": "60"},
                json={"input": {"who": "a worker"}},
                timeout=90,
            )
            assert response.status_code == 200, worker_log.read_text()
            assert response.json()["status"] == "succeeded"
            assert response.json()["output"] == "done by a worker"
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                code = worker.wait(15)
            except subprocess.TimeoutExpired:
                worker.kill()
                raise
            finally:
                served.stop()
        assert code == 0, worker_log.read_text()[-3000:]
        assert "stopping" in worker_log.read_text()


@pytest.mark.parametrize(
    ("setting", "value", "named"),
    [
        ("BRAID_AGENT_MODULES", "no_such_mod", "no_such_mod"),
        ("BRAID_EXAMPLES_DIR", "no-such-folder", "no-such-folder"),
        ("BRAID_PROMPTS_DIR", "no-such-folder", "no-such-folder"),
    ],
)
def test_serve_with_a_bad_setting_prints_one_line_and_exits_2(
    tmp_path: Path, setting: str, value: str, named: str
) -> None:
    """Not a traceback out of the server's startup (uvicorn's exit 3): one line naming it, exit 2."""
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve"],
        cwd=tmp_path,
        env=serve_env(tmp_path, 0, **{setting: value}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert setting in done.stderr
    assert named in done.stderr
