"""The ``http`` agent against a small HTTP server on loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from agents.http import HTTPConfig, http
from server.engine.context import NodeContext, Resources
from server.errors import ExpressionError, NodeError, RetryableError
from server.mockllm import LocalServer

pytestmark = pytest.mark.anyio

Message = MutableMapping[str, Any]


async def app(
    scope: Message, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
) -> None:
    """``/json`` and ``/echo`` answer JSON (echo: the request), ``/text`` text, ``/status/N`` N."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    path: str = scope["path"]
    status, content_type, payload = 200, b"application/json", b""
    if path == "/json":
        payload = json.dumps({"ok": True, "items": [1, 2]}).encode()
    elif path == "/echo":
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        echoed = {
            "method": scope["method"],
            "query": scope["query_string"].decode(),
            "token": headers.get("x-token"),
            "content_type": headers.get("content-type"),
            "body": body.decode(),
        }
        payload = json.dumps(echoed).encode()
    elif path == "/text":
        content_type, payload = b"text/plain; charset=utf-8", b"plain words"
    elif path.startswith("/status/"):
        status, content_type = int(path.rsplit("/", 1)[1]), b"text/plain"
        payload = b"no such thing here" if status == 404 else b"try again later"
    else:
        status, content_type, payload = 404, b"text/plain", b"unknown path"
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]}
    )
    await send({"type": "http.response.body", "body": payload})


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[LocalServer]:
    async with LocalServer(app) as local:
        yield local


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as shared:
        yield shared


async def call(client: httpx.AsyncClient, variables: dict[str, Any] | None = None, **fields: Any) -> Any:
    ctx = NodeContext(
        run_id="run-1",
        graph="g",
        node="fetch",
        attempt=1,
        iteration=0,
        variables=variables or {"input": {}, "outputs": {}},
        resources=Resources(client),
    )
    return await http(HTTPConfig.model_validate(fields), ctx)


async def test_a_json_response_is_parsed(server: LocalServer, client: httpx.AsyncClient) -> None:
    assert await call(client, url=f"{server.url}/json") == {"ok": True, "items": [1, 2]}


async def test_a_text_response_is_returned_as_text(server: LocalServer, client: httpx.AsyncClient) -> None:
    assert await call(client, url=f"{server.url}/text") == "plain words"


async def test_templates_are_rendered_in_url_headers_and_json(
    server: LocalServer, client: httpx.AsyncClient
) -> None:
    variables = {"input": {"q": "tides", "token": "s3cret"}, "outputs": {"write": "A draft."}}
    output = await call(
        client,
        variables,
        method="post",
        url=server.url + "/echo?q={{ input.q }}",
        headers={"X-Token": "{{ input.token }}"},
        json={"text": "{{ outputs.write }}", "n": 2, "tags": ["{{ input.q | upper }}"]},
    )
    assert output["method"] == "POST"
    assert output["query"] == "q=tides"
    assert output["token"] == "s3cret"
    assert output["content_type"] == "application/json"
    assert json.loads(output["body"]) == {"text": "A draft.", "n": 2, "tags": ["TIDES"]}


async def test_a_text_body_is_sent_as_rendered(server: LocalServer, client: httpx.AsyncClient) -> None:
    output = await call(
        client,
        {"input": {"name": "Ada"}},
        method="PUT",
        url=f"{server.url}/echo",
        body="hello {{ input.name }}",
    )
    assert (output["method"], output["body"]) == ("PUT", "hello Ada")


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_rate_limits_and_server_errors_are_retryable(
    server: LocalServer, client: httpx.AsyncClient, status: int
) -> None:
    with pytest.raises(RetryableError) as failure:
        await call(client, url=f"{server.url}/status/{status}")
    assert failure.value.retryable
    assert f"returned {status}" in str(failure.value)


async def test_a_not_found_fails_at_once_with_the_body(
    server: LocalServer, client: httpx.AsyncClient
) -> None:
    with pytest.raises(NodeError) as failure:
        await call(client, url=f"{server.url}/status/404?key=hidden")
    message = str(failure.value)
    assert not failure.value.retryable
    assert message == f"HTTP GET {server.url}/status/404 returned 404 Not Found: no such thing here"
    assert "hidden" not in message


async def test_a_refused_connection_is_retryable(client: httpx.AsyncClient) -> None:
    async with LocalServer(app) as gone:
        url = f"{gone.url}/json"
    with pytest.raises(RetryableError, match="ConnectError"):
        await call(client, url=url)


async def test_a_bad_url_is_not_retryable(client: httpx.AsyncClient) -> None:
    with pytest.raises(NodeError) as failure:
        await call(client, {"input": {"u": "ftp://example.com/x"}}, url="{{ input.u }}")
    assert not failure.value.retryable


async def test_a_template_error_fails_the_node(client: httpx.AsyncClient) -> None:
    with pytest.raises(ExpressionError, match="missing"):
        await call(client, {"input": {}}, url="http://127.0.0.1/{{ input.missing }}")


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({}, "url"),
        ({"url": "http://x", "method": "TRACE"}, "method"),
        ({"url": "http://x", "json": {}, "body": "b"}, "at most one of `json`"),
        ({"url": "http://x", "headers": ["a"]}, "mapping of header names"),
        ({"url": "{{ broken"}, "invalid template"),
    ],
)
def test_invalid_configs_are_rejected(fields: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        HTTPConfig.model_validate(fields)
