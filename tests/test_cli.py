"""The `braid` command as a user types it: validate files locally, push them, run graphs."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.cli import Progress, main, poll
from tests.conftest import PROMPTS_DIR, Served

GOOD = """\
name: {name}
description: Greets.
input:
  type: object
  required: [who]
  properties: {{who: {{type: string}}}}
nodes:
  greet:
    agent: template
    template: "Hello {{{{ input.who }}}}"
  shout:
    agent: template
    template: "{{{{ outputs.greet }}}}!"
edges:
  - {{from: greet, to: shout}}
output: outputs.shout
"""

BAD = """\
name: bad
nodes:
  a:
    agent: no-such-kind
  b:
    agent: template
    template: "{{ unclosed"
edges:
  - {from: a, to: ghost}
"""

FAILING = """\
name: {name}
nodes:
  broken:
    agent: template
    template: "{{{{ input.missing.deeper }}}}"
"""


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """``cli("run", ...)`` runs ``braid run ...`` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setenv("BRAID_PROMPTS_DIR", str(PROMPTS_DIR))

    def run(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exited:
            main(list(args))
        out, err = capsys.readouterr()
        return int(exited.value.code or 0), out, err

    return run


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def write(tmp_path: Path, text: str, name: str = "graph.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_validate_a_good_file(cli: Any, tmp_path: Path) -> None:
    code, out, _ = cli("validate", str(write(tmp_path, GOOD.format(name="hello"))))
    assert code == 0
    assert out.startswith("valid")
    assert "hello" in out


def test_validate_a_bad_file_lists_every_problem(tmp_path: Path) -> None:
    # The installed console script, as a user runs it.
    script = Path(sys.executable).parent / "braid"
    path = write(tmp_path, BAD)
    done = subprocess.run([str(script), "validate", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert "invalid" in lines[0]
    paths = [line.strip().split(":")[0] for line in lines[1:]]
    assert any(p.startswith("nodes.a") for p in paths), done.stdout
    assert any(p.startswith("nodes.b") for p in paths), done.stdout
    assert any(p.startswith("edges") for p in paths), done.stdout


def test_validate_a_missing_file_exits_2(cli: Any, tmp_path: Path) -> None:
    code, _, err = cli("validate", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert "cannot read" in err


def test_push_creates_then_updates(cli: Any, served: Served, tmp_path: Path) -> None:
    name = unique("pushed")
    path = write(tmp_path, GOOD.format(name=name))
    code, out, _ = cli("push", str(path), "--server", served.url)
    assert code == 0
    assert f"{name} version 1" in out
    code, out, _ = cli("push", str(path), "--server", served.url)
    assert code == 0
    assert f"{name} version 2" in out
    assert httpx.get(f"{served.url}/graphs/{name}").json()["version"] == 2


def test_push_an_invalid_graph_prints_the_problems(cli: Any, served: Served, tmp_path: Path) -> None:
    code, _, err = cli("push", str(write(tmp_path, BAD)), "--server", served.url)
    assert code == 1
    assert "error 422" in err
    assert "nodes.a" in err


def test_push_to_no_server_says_so(cli: Any, tmp_path: Path) -> None:
    from tests.server_process import free_port

    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = cli("push", str(write(tmp_path, GOOD.format(name="x"))), "--server", url)
    assert code == 2
    assert "cannot reach Braid" in err


def test_run_prints_the_run_id(cli: Any, served: Served, tmp_path: Path) -> None:
    name = unique("plain")
    cli("push", str(write(tmp_path, GOOD.format(name=name))), "--server", served.url)
    code, out, _ = cli("run", name, "--input", '{"who": "id"}', "--server", served.url)
    assert code == 0
    run_id = out.strip()
    assert httpx.get(f"{served.url}/runs/{run_id}").json()["graph"] == name


def test_run_wait_prints_the_output(cli: Any, served: Served, tmp_path: Path) -> None:
    name = unique("waited")
    cli("push", str(write(tmp_path, GOOD.format(name=name))), "--server", served.url)
    code, out, _ = cli("run", name, "--input", '{"who": "you"}', "--wait", "--server", served.url)
    assert code == 0
    assert "succeeded" in out
    assert "Hello you!" in out


def test_run_wait_of_a_failing_graph_exits_1(cli: Any, served: Served, tmp_path: Path) -> None:
    name = unique("failing")
    cli("push", str(write(tmp_path, FAILING.format(name=name))), "--server", served.url)
    code, out, _ = cli("run", name, "--wait", "--server", served.url)
    assert code == 1
    assert "failed" in out


def test_run_with_bad_input(cli: Any, served: Served, tmp_path: Path) -> None:
    name = unique("strict")
    cli("push", str(write(tmp_path, GOOD.format(name=name))), "--server", served.url)
    code, _, err = cli("run", name, "--input", "{}", "--server", served.url)
    assert code == 1
    assert "error 422" in err
    assert "input" in err
    code, _, err = cli("run", name, "--input", "{not json", "--server", served.url)
    assert code == 2
    assert "--input must be JSON" in err


def test_run_follow_prints_the_events_and_the_output(cli: Any, served: Served, tmp_path: Path) -> None:
    name = unique("followed")
    cli("push", str(write(tmp_path, GOOD.format(name=name))), "--server", served.url)
    code, out, _ = cli("run", name, "--input", '{"who": "all"}', "--follow", "--server", served.url)
    assert code == 0, out
    lines = out.splitlines()
    kinds = [line.split("]", 1)[1].split()[0] for line in lines if line.startswith("[")]
    assert kinds[0] == "workflow.started"
    assert kinds[-1] == "workflow.finished"
    assert kinds.count("node.completed") == 2
    assert any("node.completed" in line and "greet" in line and "Hello all" in line for line in lines)
    assert "2/2 nodes done" in out
    assert lines[-1] == "Hello all!"


def test_follow_falls_back_to_polling_without_the_events_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.cli.POLL_SECONDS", 0)
    node = {"node": "greet", "iteration": 0, "index": None, "attempts": 1, "output": "hi", "error": None}
    states = [
        {
            "id": "r1",
            "status": "running",
            "nodes": [{**node, "status": "running", "started_at": "2026-01-01T00:00:00+00:00"}],
        },
        {
            "id": "r1",
            "status": "succeeded",
            "output": "hi!",
            "duration_ms": 12,
            "nodes": [
                {
                    **node,
                    "status": "succeeded",
                    "started_at": "2026-01-01T00:00:00+00:00",
                    "finished_at": "2026-01-01T00:00:00.500000+00:00",
                    "duration_ms": 500,
                }
            ],
        },
    ]

    def answer(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/runs/r1"
        return httpx.Response(200, json=states.pop(0) if len(states) > 1 else states[0])

    import io

    out = io.StringIO()
    with httpx.Client(base_url="http://braid.test", transport=httpx.MockTransport(answer)) as http:
        code = poll(http, "r1", Progress(out, total=1))
    assert code == 0
    text = out.getvalue()
    assert "node.started" in text
    assert "node.completed" in text
    assert "[  0.50s] node.completed" in text
    assert "1/1 nodes done" in text
    assert text.splitlines()[-1] == "hi!"  # a text output is printed as is, not JSON-quoted


def test_worker_needs_redis(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BRAID_REDIS_URL", raising=False)
    code, _, err = cli("worker")
    assert code == 2
    assert "BRAID_REDIS_URL" in err


def test_serve_with_a_bad_setting_names_it(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRAID_PORT", "eighty")
    code, out, err = cli("serve")
    assert code == 2
    assert "BRAID_PORT" in err
    assert out == ""


def test_serve_and_worker_with_an_agent_module_that_cannot_be_imported(
    cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BRAID_AGENT_MODULES", "no_such_mod")
    code, out, err = cli("serve")
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert "BRAID_AGENT_MODULES" in err
    assert "no_such_mod" in err
    # The worker checks its modules before it connects to anything.
    monkeypatch.setenv("BRAID_REDIS_URL", "redis://127.0.0.1:1")
    monkeypatch.setenv("BRAID_DATABASE_URL", "postgresql+asyncpg://braid@127.0.0.1:1/braid")
    code, out, err = cli("worker")
    assert code == 2
    assert err.count("\n") == 1
    assert "BRAID_AGENT_MODULES" in err
    assert "no_such_mod" in err


@pytest.mark.parametrize("name", ["BRAID_EXAMPLES_DIR", "BRAID_PROMPTS_DIR"])
def test_serve_with_a_folder_setting_that_is_not_a_folder_names_it(
    cli: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str
) -> None:
    a_file = write(tmp_path, "not a folder", "a-file.txt")
    for value, what in ((str(tmp_path / "missing"), "does not exist"), (str(a_file), "is not a folder")):
        monkeypatch.setenv(name, value)
        code, out, err = cli("serve")
        assert code == 2
        assert out == ""
        assert err.count("\n") == 1
        assert name in err
        assert what in err


def test_unset_folder_settings_may_point_nowhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from server.config import Settings, check_folders

    monkeypatch.chdir(tmp_path)  # no ./examples, no ./prompts here
    settings = Settings.from_env({})
    check_folders({})
    assert settings.prompts_dir == Path("prompts")
    assert settings.examples_dir == Path("examples")
    check_folders({"BRAID_EXAMPLES_DIR": " ", "BRAID_PROMPTS_DIR": ""})
