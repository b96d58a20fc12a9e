"""The offline mock model: a deterministic, streaming, OpenAI-compatible chat-completions server.

``braid serve`` starts it on a free loopback port when no OPENAI_API_KEY / OPENAI_BASE_URL is set
and points the default LLM client at it, so the quickstart works offline and every LLM call still
goes through the openai SDK over HTTP. It is not a language model: its replies are built from the
prompt's own words, seeded by a hash of the messages, so the same request always gets the same
reply. What it honours:

- ``response_format`` ``json_schema``: a JSON value that satisfies the schema. A boolean named
  ``approved`` is false unless the prompt says it is a revision (``revision 1`` or more), so a
  write/critique loop runs exactly twice.
- ``response_format`` ``json_object``: a small JSON object about the request.
- plain text: a short paragraph on the prompt's subject (a ``Topic:``/``Angle:`` line, else its
  key words), saying that it comes from the offline mock.
- ``stream`` (word chunks, ``delay`` seconds apart) with ``stream_options.include_usage``;
  ``max_tokens`` (the reply is cut, ``finish_reason: "length"``). Tokens are words.

Every reply is labelled: model owner ``braid-mock``, system fingerprint ``fp_braid_mock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import json
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any, Self, cast

import anyio
import uvicorn
from litestar import Litestar, Request, get, post
from litestar.datastructures import State
from litestar.response import Response, Stream

OWNER = "braid-mock"
FINGERPRINT = "fp_braid_mock"
MOCK_MODELS = ("braid-mock", "gpt-4o-mini", "gpt-4o")

_STOP_TEXT = (
    "about above after again against also among and another answer any are as assistant back "
    "based because been before being below between both brief but can could does doing down during "
    "each exactly explain following for from further give given have having here into its itself "
    "just json keep like list make more most must need only other over please reply respond "
    "response return same should short some such than that their them then there these they this "
    "those through under until using very want what when where which while will with within would "
    "write your you you're yours text words sentence sentences paragraph paragraphs "
    # the vocabulary of instructions rather than of subjects
    "accurate angle angles approve approved audience body brief careful changes clearly concrete "
    "disputed distinct draft earlier editor example facts findings general headings invent never "
    "note notes phrase plain plainly planner preamble previous prose ready research researched "
    "researching review revision rewritten sources specific state still structured title true false "
    "uncertain written fair demanding whether "
    # the mock's own phrasing, which comes back in prompts that quote earlier replies
    "take comes thoughts main threads shape points stand closer look shows keeps coming conclusion weigh "
    "practice matters taken account part worth watching covers lines offline mock model braid braid's "
    "braid-mock prompt's real openai_api_key openai_base_url tighten opening addresses"
)
_STOP_WORDS = frozenset(_STOP_TEXT.split())
_SUBJECT_KEYS = ("angle", "question", "topic", "subject", "title")
_FILLERS = ("context", "evidence", "trade-offs", "adoption", "timing", "costs")
_ASPECTS = (
    "origins and background",
    "how it works today",
    "key players and incentives",
    "costs and trade-offs",
    "risks and open questions",
    "what comes next",
)
_REVISION = re.compile(r"\b(?:revision|iteration)\s*(?:#|no\.?|number)?\s*(\d+)", re.IGNORECASE)


# --- the replies ---------------------------------------------------------------------------------


class _Prompt:
    """What the mock reads from a request's messages."""

    def __init__(self, messages: list[Any]) -> None:
        texts = [
            (str(m.get("role", "")), _content_text(m.get("content"))) for m in messages if isinstance(m, dict)
        ]
        self.all = "\n".join(text for _, text in texts)
        users = [text for role, text in texts if role == "user"]
        self.user = users[-1] if users else self.all
        self.seed = int.from_bytes(hashlib.sha256(self.all.encode()).digest()[:8], "big")
        words = _keywords(self.user)
        self.subject = _subject(self.user) or " ".join(words[:3]) or "this request"
        self.headings = [h.strip() for h in re.findall(r"^#{1,6}[ \t]+(.+)$", self.user, re.MULTILINE)]
        in_subject = set(_keywords(" ".join([self.subject, *self.headings])))
        self.words = [w for w in words if w not in in_subject] + [w for w in _FILLERS if w not in words]
        self.revision = max((int(n) for n in _REVISION.findall(self.all)), default=0)

    def pick(self, options: tuple[str, ...] | list[str], salt: int = 0) -> str:
        return options[(self.seed + salt) % len(options)]

    def word(self, i: int) -> str:
        return self.words[i % len(self.words)]


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = cast(list[Any], content)
        return "\n".join(str(p.get("text", "")) for p in parts if isinstance(p, dict))
    return ""


def _keywords(text: str) -> list[str]:
    seen: dict[str, None] = {}
    for word in re.findall(r"[A-Za-z][A-Za-z'-]{3,}", text):
        lower = word.lower().strip("'-")
        if lower not in _STOP_WORDS and lower not in _SUBJECT_KEYS and len(lower) > 3:
            seen.setdefault(lower, None)
    return list(seen)


def _subject(text: str) -> str | None:
    for key in _SUBJECT_KEYS:
        match = re.search(rf"^\W*{key}\s*:\s*(.+?)\s*$", text, re.IGNORECASE | re.MULTILINE)
        if match:
            return match.group(1).strip(" .\"'")[:120]
    return None


def reply_text(prompt: _Prompt) -> str:
    """A few sentences on the prompt's subject, plainly labelled as the offline mock's."""
    w = prompt.word
    opening = prompt.pick(
        (
            f"Here is a short take on {prompt.subject}.",
            f"A brief note on {prompt.subject}.",
            f"Some thoughts on {prompt.subject}.",
        )
    )
    middle = prompt.pick(
        (
            f"The main threads are {w(0)}, {w(1)} and {w(2)}, and how they shape one another.",
            f"It comes down to {w(0)} and {w(1)}, with {w(2)} as the part most worth watching.",
            f"Three points stand out: {w(0)}, {w(1)} and {w(2)}.",
        ),
        salt=1,
    )
    detail = prompt.pick(
        (
            f"In practice, {w(3)} matters most when {w(4)} is taken into account.",
            f"A closer look at {w(3)} shows why {w(4)} keeps coming up.",
            f"Any conclusion should weigh {w(3)} against {w(4)}.",
        ),
        salt=2,
    )
    covered = ""
    if prompt.headings:
        points = [h.split(": ", 1)[1] if h.startswith(f"{prompt.subject}: ") else h for h in prompt.headings]
        covered = f"It covers {len(points)} lines of research: {'; '.join(points)}."
    closing = (
        "(Written by Braid's offline mock model, braid-mock, from the prompt's own words; "
        "set OPENAI_API_KEY or OPENAI_BASE_URL to use a real model.)"
    )
    return " ".join(part for part in (opening, covered, middle, detail, closing) if part)


def reply_object(prompt: _Prompt, model: str) -> dict[str, Any]:
    """The ``json_object`` reply: a small object about the request."""
    return {
        "model": model,
        "mock": True,
        "subject": prompt.subject,
        "keywords": prompt.words[:5],
        "summary": reply_text(prompt).split(" (Written by", 1)[0],
    }


def reply_schema(schema: Mapping[str, Any], prompt: _Prompt) -> Any:
    """A JSON value that satisfies ``schema`` (the usual keywords; no ``pattern``), from the prompt."""
    return _Instance(schema, prompt).make(schema, "", 0)


class _Instance:
    def __init__(self, root: Mapping[str, Any], prompt: _Prompt) -> None:
        self.root = root
        self.prompt = prompt

    def resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            target: Any = self.root
            for part in ref[2:].split("/"):
                target = target.get(part, {}) if isinstance(target, dict) else {}
            return cast(Mapping[str, Any], target) if isinstance(target, dict) else {}
        return schema

    def make(self, schema: Any, name: str, depth: int) -> Any:
        if not isinstance(schema, dict) or depth > 8:
            return self.string({}, name, depth)
        schema = self.resolve(cast(Mapping[str, Any], schema))
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][0]
        for key in ("anyOf", "oneOf"):
            options = [
                o for o in schema.get(key) or [] if not (isinstance(o, dict) and o.get("type") == "null")
            ]
            if options:
                return self.make(options[0], name, depth + 1)
        if isinstance(schema.get("allOf"), list):
            merged: dict[str, Any] = {}
            for part in schema["allOf"]:
                if isinstance(part, dict):
                    for k, v in self.resolve(cast(Mapping[str, Any], part)).items():
                        if k == "properties" and isinstance(v, dict):
                            merged.setdefault("properties", {}).update(v)
                        elif k == "required" and isinstance(v, list):
                            merged.setdefault("required", []).extend(v)
                        else:
                            merged[k] = v
            return self.make({**{k: v for k, v in schema.items() if k != "allOf"}, **merged}, name, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kinds = [k for k in cast(list[Any], kind) if k != "null"]
            kind = kinds[0] if kinds else "null"
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
        if kind == "object":
            return self.object(schema, depth)
        if kind == "array":
            return self.array(schema, name, depth)
        if kind == "boolean":
            return self.boolean(name)
        if kind in ("integer", "number"):
            return self.number(schema, name, integer=kind == "integer")
        if kind == "null":
            return None
        return self.string(schema, name, depth)

    def object(self, schema: Mapping[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties")
        props: dict[str, Any] = dict(properties) if isinstance(properties, dict) else {}
        for key in schema.get("required") or []:
            props.setdefault(str(key), {"type": "string"})
        return {key: self.make(sub, key, depth + 1) for key, sub in props.items()}

    def array(self, schema: Mapping[str, Any], name: str, depth: int) -> list[Any]:
        count = 3
        if isinstance(schema.get("minItems"), int):
            count = max(count, schema["minItems"])
        if isinstance(schema.get("maxItems"), int):
            count = min(count, schema["maxItems"])
        prefix = schema.get("prefixItems")
        items = schema.get("items", {"type": "string"})
        result: list[Any] = []
        for i in range(count):
            sub = prefix[i] if isinstance(prefix, list) and i < len(prefix) else items
            result.append(self.make(sub, f"{name}#{i}", depth + 1))
        return result

    def boolean(self, name: str) -> bool:
        if name == "approved":
            return self.prompt.revision >= 1
        return (self.prompt.seed + len(name)) % 2 == 0

    def number(self, schema: Mapping[str, Any], name: str, *, integer: bool) -> int | float:
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        high = schema.get("maximum", schema.get("exclusiveMaximum", max(low, 0) + 10))
        if "exclusiveMinimum" in schema and "minimum" not in schema:
            low += 1 if integer else 0.5
        if "exclusiveMaximum" in schema and "maximum" not in schema:
            high -= 1 if integer else 0.5
        if high < low:
            high = low
        span = high - low
        value = low + (self.prompt.seed + len(name)) % (int(span) + 1) if span >= 1 else low
        return int(value) if integer else float(value)

    def string(self, schema: Mapping[str, Any], name: str, depth: int) -> str:
        p = self.prompt
        base, _, index_text = name.partition("#")
        index = int(index_text) if index_text.isdigit() else 0
        fmt = schema.get("format")
        if fmt == "date-time":
            value = "2024-01-01T00:00:00Z"
        elif fmt == "date":
            value = "2024-01-01"
        elif fmt == "email":
            value = "mock@example.com"
        elif fmt in ("uri", "url"):
            value = f"https://example.com/{p.word(index)}"
        elif index_text:  # an item of an array: distinct aspects of the subject
            value = f"{p.subject}: {p.pick(_ASPECTS, salt=index)}"
        elif base in ("approved_reason", "notes", "feedback", "reason", "comment", "comments", "critique"):
            value = (
                "Approved: the revision addresses the earlier notes."
                if p.revision >= 1
                else f"Tighten the opening and say more about {p.word(1)} and {p.word(2)}; "
                "make the conclusion concrete."
            )
        elif base in ("title", "name", "headline"):
            value = p.subject.title()
        elif base in ("summary", "text", "content", "answer", "description", "body", "draft"):
            value = reply_text(p).split(" (Written by", 1)[0]
        else:
            value = f"{p.word(index + depth)} {p.word(index + depth + 1)}"
        min_length = schema.get("minLength")
        max_length = schema.get("maxLength")
        if isinstance(min_length, int) and len(value) < min_length:
            value = value + "." * (min_length - len(value))
        if isinstance(max_length, int):
            value = value[:max_length]
        return value


# --- the HTTP app ------------------------------------------------------------------------------


def _error(status: int, message: str, kind: str = "invalid_request_error") -> Response[Any]:
    return Response(
        {"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status
    )


def _chunk(base: Mapping[str, Any], delta: Mapping[str, Any], finish: str | None, usage: bool) -> str:
    body: dict[str, Any] = {
        **base,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage:
        body["usage"] = None
    return f"data: {json.dumps(body)}\n\n"


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any] | Stream:
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "the request body is not valid JSON")
    if not isinstance(body, dict):
        return _error(400, "the request body must be a JSON object")
    body = cast(dict[str, Any], body)
    messages = body.get("messages")
    model = body.get("model")
    if not isinstance(messages, list) or not messages:
        return _error(400, "'messages' must be a non-empty list")
    if not isinstance(model, str) or not model:
        return _error(400, "'model' is required")
    prompt = _Prompt(cast(list[Any], messages))

    response_format = body.get("response_format") or {}
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
        text = json.dumps(reply_schema(schema, prompt), ensure_ascii=False)
    elif kind == "json_object":
        text = json.dumps(reply_object(prompt, model), ensure_ascii=False)
    else:
        text = reply_text(prompt)

    tokens: list[str] = re.findall(r"\s*\S+", text)
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    finish = "stop"
    if isinstance(limit, int) and 0 < limit < len(tokens):
        tokens, finish = tokens[:limit], "length"
    usage = {
        "prompt_tokens": len(prompt.all.split()),
        "completion_tokens": len(tokens),
        "total_tokens": len(prompt.all.split()) + len(tokens),
    }
    base = {
        "id": f"chatcmpl-mock{prompt.seed:016x}",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": FINGERPRINT,
    }
    headers = {"x-request-id": f"req_mock{prompt.seed:016x}", "openai-organization": OWNER}

    if not body.get("stream"):
        completion = {
            **base,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(tokens), "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage,
        }
        return Response(completion, headers=headers)

    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    delay: float = request.app.state.delay
    chunk_base = {**base, "object": "chat.completion.chunk"}

    async def events() -> AsyncIterator[str]:
        yield _chunk(chunk_base, {"role": "assistant", "content": "", "refusal": None}, None, include_usage)
        for token in tokens:
            if delay > 0:
                await anyio.sleep(delay)
            yield _chunk(chunk_base, {"content": token}, None, include_usage)
        yield _chunk(chunk_base, {}, finish, include_usage)
        if include_usage:
            yield f"data: {json.dumps({**chunk_base, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return Stream(events(), media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})


@get("/v1/models")
async def list_models() -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": 0, "owned_by": OWNER} for name in MOCK_MODELS],
    }


def create_app(delay: float = 0.02) -> Litestar:
    """The mock model's ASGI app; ``delay`` is the pause in seconds between streamed chunks."""
    return Litestar(
        route_handlers=[chat_completions, list_models],
        state=State({"delay": delay}),
        openapi_config=None,
        logging_config=None,
    )


# --- running it ----------------------------------------------------------------------------------


_IN_LOCAL_SERVER = contextvars.ContextVar("braid_in_local_server", default=False)


class _HostNoticesOnly(logging.Filter):
    """uvicorn's notices from a ``LocalServer`` ("Started server process", "Uvicorn running on
    ...") are dropped, its warnings and errors kept: the host server says it started. (Its
    ``log_level`` would set uvicorn's loggers for the whole process: ``braid serve`` with the mock
    model lost its own startup lines that way.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not _IN_LOCAL_SERVER.get()


def _quiet_local_servers() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _HostNoticesOnly) for f in logger.filters):
        logger.addFilter(_HostNoticesOnly())


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield  # the host process owns the signals; it stops this server itself


class LocalServer:
    """Serve an ASGI app with uvicorn on a free loopback port, in the current event loop.

    The port is bound (and listening) before ``start()`` returns, so clients may connect at once;
    their connections wait in the backlog until uvicorn accepts them. Use it as an async context
    manager, or call ``start()`` and ``stop()``.
    """

    def __init__(self, app: Any, *, host: str = "127.0.0.1") -> None:
        self.app = app
        self.host = host
        self.port = 0
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """The server's origin, such as ``http://127.0.0.1:54321``."""
        if not self.port:
            raise RuntimeError("the server is not started; call start() or use it with `async with`")
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the server is already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_config=None,
            log_level=None,  # the process's uvicorn loggers are the host's (``_HostNoticesOnly``)
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=2,
            ws="none",
            interface="asgi3",
        )
        server = self._server = _Server(config)
        _quiet_local_servers()

        async def serve() -> None:
            _IN_LOCAL_SERVER.set(True)  # for this task and the tasks it starts
            await server.serve(sockets=[sock])

        self._task = asyncio.create_task(serve(), name=f"braid-local-server-{self.port}")

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await self._task
        finally:
            self._server = self._task = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class MockModelServer(LocalServer):
    """The offline mock model on a free loopback port; point an OpenAI client at ``base_url``."""

    def __init__(self, delay: float = 0.02, *, host: str = "127.0.0.1") -> None:
        super().__init__(create_app(delay), host=host)

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, such as ``http://127.0.0.1:54321/v1``."""
        return f"{self.url}/v1"
