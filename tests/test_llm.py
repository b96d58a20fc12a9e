"""The ``llm`` agent through the real openai SDK against a scripted loopback server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agents.llm import LLMConfig, llm
from agents.providers import LLMClients
from server.engine.context import NodeContext, Resources
from server.errors import NodeError, RetryableError
from server.graph.fields import ValidationContext
from tests.llm_server import Reply, ScriptedLLM

pytestmark = pytest.mark.anyio

SCHEMA = {
    "type": "object",
    "required": ["approved", "notes"],
    "properties": {"approved": {"type": "boolean"}, "notes": {"type": "string"}},
}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def shared_server() -> AsyncIterator[ScriptedLLM]:
    async with ScriptedLLM() as scripted:
        yield scripted


@pytest.fixture
def server(shared_server: ScriptedLLM) -> ScriptedLLM:
    """The module's server with an empty script and no recorded requests."""
    shared_server.script.clear()
    shared_server.requests.clear()
    return shared_server


@pytest.fixture
async def clients(server: ScriptedLLM) -> AsyncIterator[LLMClients]:
    llm_clients = LLMClients(server.base_url, "test-key", default_model="gpt-4o-mini")
    yield llm_clients
    await llm_clients.aclose()


def config(prompts_dir: Path | None = None, **fields: Any) -> LLMConfig:
    return LLMConfig.model_validate(fields, context=ValidationContext(prompts_dir=prompts_dir))


class Run:
    """A node context for one attempt, collecting the ``node.delta`` text it streams."""

    def __init__(self, clients: LLMClients, variables: dict[str, Any] | None = None) -> None:
        self.deltas: list[str] = []

        async def emit(text: str) -> None:
            self.deltas.append(text)

        self.ctx = NodeContext(
            run_id="run-1",
            graph="g",
            node="n",
            attempt=1,
            iteration=0,
            variables=variables or {"input": {"topic": "tides"}, "outputs": {}},
            resources=Resources(clients),
            _emit_delta=emit,
        )

    async def __call__(self, cfg: LLMConfig) -> Any:
        return await llm(cfg, self.ctx)


async def test_text_output_streams_deltas_that_make_up_the_output(
    server: ScriptedLLM, clients: LLMClients
) -> None:
    server.push(Reply("Tides are caused by the moon.", chunks=("Tides", " are caused", " by the moon.")))
    run = Run(clients)

    output = await run(config(system="You explain {{ input.topic }}.", prompt="Explain {{ input.topic }}."))

    assert output == "Tides are caused by the moon."
    assert run.deltas == ["Tides", " are caused", " by the moon."]
    assert "".join(run.deltas) == output
    sent = server.requests[0]
    assert sent["model"] == "gpt-4o-mini"
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == [
        {"role": "system", "content": "You explain tides."},
        {"role": "user", "content": "Explain tides."},
    ]
    assert "response_format" not in sent


async def test_usage_is_recorded(server: ScriptedLLM, clients: LLMClients) -> None:
    server.push(Reply("ok", usage=(12, 3)))
    run = Run(clients)
    await run(config(prompt="hi"))
    assert run.ctx.usage == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}


async def test_without_streaming(server: ScriptedLLM, clients: LLMClients) -> None:
    server.push(Reply("a whole reply", usage=(4, 3)))
    run = Run(clients)

    output = await run(config(prompt="hi", stream=False, model="gpt-4o", temperature=0.2, max_tokens=50))

    assert output == "a whole reply"
    assert run.ctx.usage == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    sent = server.requests[0]
    assert sent["stream"] is False
    assert (sent["model"], sent["temperature"], sent["max_tokens"]) == ("gpt-4o", 0.2, 50)
    assert "stream_options" not in sent


async def test_json_output_parses_the_reply_even_in_a_code_fence(
    server: ScriptedLLM, clients: LLMClients
) -> None:
    server.push(Reply('```json\n{"angles": ["a", "b"]}\n```'))
    output = await Run(clients)(config(prompt="angles?", output="json"))
    assert output == {"angles": ["a", "b"]}
    assert server.requests[0]["response_format"] == {"type": "json_object"}


async def test_json_output_that_is_not_json_is_retryable(server: ScriptedLLM, clients: LLMClients) -> None:
    server.push(Reply("Sure! Here are the angles: a, b"))
    with pytest.raises(RetryableError, match="model reply is not valid JSON"):
        await Run(clients)(config(prompt="angles?", output="json"))


async def test_schema_output_sends_the_schema_and_re_asks_on_an_invalid_reply(
    server: ScriptedLLM, clients: LLMClients
) -> None:
    server.push(Reply('{"approved": "yes"}'), Reply('{"approved": true, "notes": "good"}'))
    cfg = config(prompt="review", output=SCHEMA)

    with pytest.raises(RetryableError) as first:
        await Run(clients)(cfg)
    second = await Run(clients)(cfg)

    assert first.value.retryable
    assert "model reply is not valid JSON for the output schema" in str(first.value)
    assert second == {"approved": True, "notes": "good"}
    assert server.requests[0]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": SCHEMA, "strict": False},
    }


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_rate_limits_and_server_errors_are_retryable(
    server: ScriptedLLM, clients: LLMClients, status: int
) -> None:
    server.push(Reply(status=status, message="slow down"))
    with pytest.raises(RetryableError) as failure:
        await Run(clients)(config(prompt="hi"))
    assert failure.value.retryable
    assert f": {status} " in str(failure.value)
    assert "slow down" in str(failure.value)


async def test_unauthorized_is_final_and_names_the_model_and_the_server(
    server: ScriptedLLM, clients: LLMClients
) -> None:
    server.push(Reply(status=401, message="Incorrect API key provided"))
    with pytest.raises(NodeError) as failure:
        await Run(clients)(config(prompt="hi", model="gpt-4o"))
    message = str(failure.value)
    assert not failure.value.retryable
    assert message.startswith(f"LLM call to model 'gpt-4o' at {server.base_url} failed: 401 Unauthorized")
    assert "Incorrect API key provided" in message


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_client_errors_are_final(server: ScriptedLLM, clients: LLMClients, status: int) -> None:
    server.push(Reply(status=status, message="bad request"))
    with pytest.raises(NodeError) as failure:
        await Run(clients)(config(prompt="hi"))
    assert not failure.value.retryable
    assert f"{status} " in str(failure.value)


async def test_an_unreachable_server_is_retryable() -> None:
    async with ScriptedLLM() as gone:
        base_url = gone.base_url
    clients = LLMClients(base_url, "k")
    try:
        with pytest.raises(RetryableError, match="cannot connect"):
            await Run(clients)(config(prompt="hi"))
    finally:
        await clients.aclose()


async def test_a_named_provider_gets_the_model_id_without_its_prefix(server: ScriptedLLM) -> None:
    async with ScriptedLLM(Reply("from local")) as local:
        clients = LLMClients(server.base_url, "k", providers={"local": (local.base_url, "")})
        try:
            assert await Run(clients)(config(prompt="hi", model="local/llama3")) == "from local"
        finally:
            await clients.aclose()
    assert local.requests[0]["model"] == "llama3"
    assert server.requests == []


async def test_prompt_files_render_input_and_upstream_outputs(
    server: ScriptedLLM, clients: LLMClients, tmp_path: Path
) -> None:
    (tmp_path / "brief.j2").write_text(
        "Topic: {{ input.topic }}\nNotes: {{ outputs.plan.angles | join(', ') }}\n"
    )
    (tmp_path / "sys.j2").write_text("Be brief about {{ input.topic }}.")
    server.push(Reply("done"))
    variables = {"input": {"topic": "tides"}, "outputs": {"plan": {"angles": ["moon", "sun"]}}}

    cfg = config(tmp_path, prompt_file="brief.j2", system_file="sys.j2")
    await Run(clients, variables)(cfg)

    assert server.requests[0]["messages"] == [
        {"role": "system", "content": "Be brief about tides."},
        {"role": "user", "content": "Topic: tides\nNotes: moon, sun\n"},
    ]
    assert cfg.model_dump()["prompt_file"] == "brief.j2"


def test_a_missing_prompt_file_is_an_error_on_prompt_file(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as failure:
        config(tmp_path, prompt_file="nope.j2")
    [error] = failure.value.errors()
    assert error["loc"] == ("prompt_file",)
    assert "'nope.j2' not found" in error["msg"]


def test_an_invalid_output_schema_is_an_error_on_output() -> None:
    with pytest.raises(ValidationError) as failure:
        config(prompt="hi", output={"type": "objekt"})
    [error] = failure.value.errors()
    assert error["loc"] == ("output",)
    assert "not a valid JSON Schema" in error["msg"]


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({}, "exactly one of `prompt`"),
        ({"prompt": "a", "prompt_file": "x.j2"}, "exactly one of `prompt`"),
        ({"prompt": "a", "temperature": 3}, "less than or equal to 2"),
        ({"prompt": "a", "max_tokens": 0}, "greater than or equal to 1"),
        ({"prompt": "a", "output": "xml"}, "must be text, json or a JSON Schema"),
        ({"prompt": "{{ oops"}, "invalid template"),
        ({"prompt": "a", "tools": []}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_configs_are_rejected(tmp_path: Path, fields: dict[str, Any], problem: str) -> None:
    (tmp_path / "x.j2").write_text("x")
    with pytest.raises(ValidationError, match=problem):
        config(tmp_path, **fields)


async def test_the_engine_re_asks_after_a_reply_that_fails_the_schema(
    server: ScriptedLLM, clients: LLMClients
) -> None:
    from agents.registry import default_registry
    from server.engine import Engine, MemoryRecorder
    from server.engine.records import RunInfo
    from server.graph.parse import build_graph
    from server.status import EventType, RunStatus

    spec = {
        "name": "review",
        "defaults": {"retry": {"attempts": 3, "initial_delay": 0, "jitter": False}},
        "nodes": {"critic": {"agent": "llm", "prompt": "Review {{ input.text }}", "output": SCHEMA}},
    }
    graph = build_graph(spec, default_registry(), ValidationContext())
    server.push(Reply('{"approved": "maybe"}'), Reply('{"approved": false, "notes": "shorter"}'))
    recorder = MemoryRecorder()

    await Engine(Resources(clients)).run(graph, RunInfo("run-1", "review", 1, {"text": "draft"}), recorder)

    assert recorder.run is not None
    assert recorder.run.status == RunStatus.SUCCEEDED
    [retrying] = [e for e in recorder.events if e.type == EventType.NODE_RETRYING]
    assert retrying.data["node"] == "critic"
    assert "model reply is not valid JSON for the output schema" in retrying.data["error"]
    [completed] = [e for e in recorder.events if e.type == EventType.NODE_COMPLETED]
    assert completed.data["attempts"] == 2
    assert completed.data["output"] == {"approved": False, "notes": "shorter"}
    assert len(server.requests) == 2
    sent = {"model": "gpt-4o-mini", "base_url": server.base_url, "system": None, "prompt": "Review draft"}
    assert completed.data["details"] == sent
    assert retrying.data["details"] == sent


async def test_a_failed_call_still_shows_what_was_sent(server: ScriptedLLM, clients: LLMClients) -> None:
    from agents.registry import default_registry
    from server.engine import Engine, MemoryRecorder
    from server.engine.records import RunInfo
    from server.graph.parse import build_graph
    from server.status import EventType, RunStatus

    spec = {
        "name": "ask",
        "nodes": {
            "ask": {"agent": "llm", "system": "Be {{ input.tone }}.", "prompt": "About {{ input.topic }}"}
        },
    }
    graph = build_graph(spec, default_registry(), ValidationContext())
    server.push(Reply(status=401, message="Incorrect API key provided"))
    recorder = MemoryRecorder()

    await Engine(Resources(clients)).run(
        graph, RunInfo("run-1", "ask", 1, {"tone": "brief", "topic": "tides"}), recorder
    )

    assert recorder.run is not None
    assert recorder.run.status == RunStatus.FAILED
    [failed] = [e for e in recorder.events if e.type == EventType.NODE_FAILED]
    assert "401 Unauthorized" in failed.data["error"]
    assert failed.data["details"] == {
        "model": "gpt-4o-mini",
        "base_url": server.base_url,
        "system": "Be brief.",
        "prompt": "About tides",
    }
