"""The offline mock model through the real openai SDK, and the example graphs running on it."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from agents.providers import LLMClients
from agents.registry import default_registry
from server.engine import Engine, MemoryRecorder, Resources
from server.engine.records import RunInfo
from server.graph.fields import ValidationContext
from server.graph.parse import parse_graph
from server.mockllm import FINGERPRINT, MockModelServer, create_app
from server.status import EventType, RunStatus

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.anyio

SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["title", "angles", "score", "tone", "meta", "ok"],
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "angles": {"type": "array", "items": {"type": "string"}, "minItems": 3, "uniqueItems": True},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "tone": {"enum": ["formal", "casual"]},
        "meta": {"$ref": "#/$defs/meta"},
        "ok": {"type": "boolean"},
        "maybe": {"anyOf": [{"type": "null"}, {"type": "string", "minLength": 5}]},
    },
    "$defs": {"meta": {"type": "object", "required": ["lang"], "properties": {"lang": {"type": "string"}}}},
}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def mock() -> AsyncIterator[MockModelServer]:
    async with MockModelServer(delay=0) as server:
        yield server


@pytest.fixture
async def client(mock: MockModelServer) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=mock.base_url, api_key="braid-mock", max_retries=0)
    yield sdk
    await sdk.close()


def user(text: str) -> list[Any]:
    return [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": text}]


async def stream_text(client: openai.AsyncOpenAI, text: str, **params: Any) -> tuple[list[str], Any, Any]:
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=user(text),
        stream=True,
        stream_options={"include_usage": True},
        **params,
    )
    pieces: list[str] = []
    usage = finish = None
    async with stream:
        async for chunk in stream:
            assert chunk.system_fingerprint == FINGERPRINT
            assert chunk.model == "gpt-4o-mini"
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                finish = choice.finish_reason or finish
    return pieces, usage, finish


async def test_streams_a_reply_in_several_chunks_with_usage(client: openai.AsyncOpenAI) -> None:
    pieces, usage, finish = await stream_text(client, "Topic: tidal power\nExplain the economics of it.")

    text = "".join(pieces)
    assert len(pieces) > 10
    assert text.startswith(
        ("Here is a short take on tidal power", "A brief note on tidal power", "Some thoughts")
    )
    assert "offline mock" in text
    assert finish == "stop"
    assert usage is not None
    assert usage.completion_tokens == len(pieces)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_is_deterministic_for_the_same_messages(client: openai.AsyncOpenAI) -> None:
    first, _, _ = await stream_text(client, "Topic: tidal power")
    again, _, _ = await stream_text(client, "Topic: tidal power")
    other, _, _ = await stream_text(client, "Topic: geothermal heat")
    assert first == again
    assert "".join(other) != "".join(first)


async def test_honours_a_json_schema(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=user("Topic: tidal power\nPlan the research."),
        response_format={"type": "json_schema", "json_schema": {"name": "output", "schema": SCHEMA}},
    )
    content = completion.choices[0].message.content or ""
    value = json.loads(content)

    jsonschema.validate(value, SCHEMA)
    assert all(angle.startswith("tidal power: ") for angle in value["angles"])
    again = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=user("Topic: tidal power\nPlan the research."),
        response_format={"type": "json_schema", "json_schema": {"name": "output", "schema": SCHEMA}},
    )
    assert again.choices[0].message.content == content


async def test_a_critic_approves_only_a_revision(client: openai.AsyncOpenAI) -> None:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"approved": {"type": "boolean"}, "notes": {"type": "string"}},
    }
    verdicts = []
    for prompt in (
        "Review this draft on tides.",
        "This is revision 1 of the draft. Review this draft on tides.",
    ):
        completion = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=user(prompt),
            response_format={"type": "json_schema", "json_schema": {"name": "output", "schema": schema}},
        )
        verdicts.append(json.loads(completion.choices[0].message.content or ""))
    assert [v["approved"] for v in verdicts] == [False, True]
    assert all(v["notes"] for v in verdicts)


async def test_json_object_mode_replies_with_an_object(client: openai.AsyncOpenAI) -> None:
    pieces, _, _ = await stream_text(client, "Topic: tidal power", response_format={"type": "json_object"})
    value = json.loads("".join(pieces))
    assert value["subject"] == "tidal power"
    assert value["mock"] is True


async def test_max_tokens_cuts_the_reply(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="gpt-4o-mini", messages=user("Topic: tidal power"), max_tokens=4
    )
    assert completion.choices[0].finish_reason == "length"
    assert len((completion.choices[0].message.content or "").split()) == 4
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 4


async def test_lists_its_models_and_rejects_bad_requests(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert {m.owned_by for m in models.data} == {"braid-mock"}
    with pytest.raises(openai.BadRequestError, match="'messages' must be a non-empty list"):
        await client.chat.completions.create(model="gpt-4o-mini", messages=[])


async def test_create_app_streams_through_a_plain_asgi_transport() -> None:
    transport = httpx.ASGITransport(app=create_app(delay=0))  # pyright: ignore[reportArgumentType]
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as http:
        response = await http.post(
            "/v1/chat/completions", json={"model": "m", "messages": user("hello there"), "stream": True}
        )
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0].removeprefix("data: "))["object"] == "chat.completion.chunk"


# --- the example graphs, offline --------------------------------------------------------------


async def run_example(name: str, run_input: dict[str, Any], mock: MockModelServer) -> MemoryRecorder:
    graph = parse_graph(
        (ROOT / "examples" / f"{name}.yaml").read_text(),
        default_registry(),
        ValidationContext(prompts_dir=ROOT / "prompts"),
        "application/yaml",
    )
    clients = LLMClients(mock.base_url, "braid-mock")
    recorder = MemoryRecorder()
    try:
        async with httpx.AsyncClient() as http:
            await Engine(Resources(clients, http)).run(
                graph, RunInfo("run-1", graph.name, 1, run_input), recorder
            )
    finally:
        await clients.aclose()
    return recorder


def runs_of(recorder: MemoryRecorder) -> Counter[str]:
    return Counter(e.data["node"] for e in recorder.events if e.type == EventType.NODE_COMPLETED)


async def test_the_research_brief_example_loops_once_and_publishes(mock: MockModelServer) -> None:
    recorder = await run_example("research-brief", {"topic": "solid-state batteries"}, mock)

    assert recorder.run is not None
    assert recorder.run.status == RunStatus.SUCCEEDED, recorder.run.error
    ran = runs_of(recorder)
    assert ran["plan"] == 1
    assert ran["write"] == 2
    assert ran["critic"] == 2
    assert ran["publish"] == 1
    critic = [
        e.data["output"]
        for e in recorder.events
        if e.type == EventType.NODE_COMPLETED and e.data["node"] == "critic"
    ]
    assert [c["approved"] for c in critic] == [False, True]
    output = recorder.run.output
    assert isinstance(output, str)
    assert "solid-state batteries" in output
    assert "Angles researched: solid-state batteries: " in output
    deltas = [
        e.data["delta"]
        for e in recorder.events
        if e.type == EventType.NODE_DELTA and e.data["node"] == "write"
    ]
    assert len(deltas) > 10
    assert recorder.run.usage["total_tokens"] > 0


async def test_the_fan_out_example_runs_without_a_model(mock: MockModelServer) -> None:
    recorder = await run_example("fan-out", {"words": ["red", "green"], "rounds": 2}, mock)

    assert recorder.run is not None
    assert recorder.run.status == RunStatus.SUCCEEDED, recorder.run.error
    assert recorder.run.output == {
        "shouted": ["1. RED!", "2. GREEN!"],
        "batch": "2 items: a small batch",
        "rounds": 2,
    }
    skipped = [e.data["node"] for e in recorder.events if e.type == EventType.NODE_SKIPPED]
    assert skipped == ["big"]
    assert runs_of(recorder)["tick"] == 2
