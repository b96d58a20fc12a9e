"""A scriptable OpenAI-compatible chat-completions server on loopback, for tests.

openai 3.x talks through httpx2, which respx cannot intercept, so tests run the real SDK against
this server. It answers each request with the next ``Reply`` of its script and records every
request body::

    async with ScriptedLLM(Reply("hello"), Reply(status=429)) as llm:
        clients = LLMClients(llm.base_url, "test-key")
        ...
        assert llm.requests[0]["model"] == "gpt-4o-mini"
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from server.mockllm import LocalServer

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Reply:
    """One scripted answer: ``content`` (streamed as ``chunks`` when given, else word by word), or an
    error ``status`` with ``message`` in OpenAI's error shape."""

    content: str = ""
    status: int = 200
    message: str = "scripted error"
    chunks: tuple[str, ...] | None = None
    usage: tuple[int, int] | None = (11, 7)


class ScriptedLLM:
    """The server; use it with ``async with`` and read ``base_url`` and ``requests``."""

    def __init__(self, *replies: Reply) -> None:
        self.script: deque[Reply] = deque(replies)
        self.requests: list[dict[str, Any]] = []
        self._server = LocalServer(self.app)

    @property
    def base_url(self) -> str:
        return f"{self._server.url}/v1"

    def push(self, *replies: Reply) -> None:
        self.script.extend(replies)

    async def __aenter__(self) -> Self:
        await self._server.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._server.stop()

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["method"] != "POST" or not scope["path"].endswith("/chat/completions"):
            await _send(send, 404, {"error": {"message": "not found", "type": "invalid_request_error"}})
            return
        request = json.loads(body)
        self.requests.append(request)
        reply = self.script.popleft() if self.script else Reply(status=500, message="the test script ran out")
        if reply.status != 200:
            error = {"message": reply.message, "type": "scripted", "param": None, "code": None}
            await _send(send, reply.status, {"error": error})
            return
        usage = None
        if reply.usage is not None:
            prompt, completion = reply.usage
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
        base = {"id": "chatcmpl-test", "created": 1, "model": request["model"]}
        if not request.get("stream"):
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": reply.content},
                "finish_reason": "stop",
            }
            await _send(send, 200, {**base, "object": "chat.completion", "choices": [choice], "usage": usage})
            return
        chunks = reply.chunks if reply.chunks is not None else re.findall(r"\s*\S+", reply.content)
        include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        base = {**base, "object": "chat.completion.chunk"}
        deltas = [{"role": "assistant", "content": ""}, *({"content": c} for c in chunks), {}]
        for i, delta in enumerate(deltas):
            finish = "stop" if i == len(deltas) - 1 else None
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            await _event(send, {**base, "choices": [choice]})
        if include_usage and usage is not None:
            await _event(send, {**base, "choices": [], "usage": usage})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


async def _send(send: Send, status: int, payload: Any) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


async def _event(send: Send, payload: Any) -> None:
    await send(
        {"type": "http.response.body", "body": f"data: {json.dumps(payload)}\n\n".encode(), "more_body": True}
    )
