"""A lean HTTP/1.1 client for the benchmarks: one keep-alive connection per ``Connection``, the
response parsed by ``httptools`` (the parser uvicorn uses), SSE ``data:`` lines decoded as JSON.

The benchmarks drive a server on the same 2-core machine, so the client's own cost is in every
figure. httpx spent about as much CPU per streamed run as the server did, and its connection
pool walks every connection for every request (O(connections) per request: at 32-60 connections
most of the client's time); this client costs a fraction of that, so the figures measure the
server rather than the client.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import httptools

READ_SIZE = 65536


class HTTPStatusError(Exception):
    """The server answered with an unexpected status."""


@dataclass
class Response:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class _Parsed:
    """httptools' callbacks: the body parts received so far, whether the message is done, and
    whether the connection stays open after it (read with the head: once the message is
    complete, llhttp's ``should_keep_alive`` says False whatever the response said)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.head = False
        self.done = False
        self.keep_alive = False
        self.parser: httptools.HttpResponseParser | None = None

    def on_headers_complete(self) -> None:
        self.head = True
        self.keep_alive = self.parser is not None and self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.parts.append(body)

    def on_message_complete(self) -> None:
        self.done = True


class Connection:
    """One keep-alive HTTP/1.1 connection to ``host:port`` (opened on first use, and again after
    the server closed it). Not for concurrent use: one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._stream: anyio.abc.SocketStream | None = None
        self.opened = 0
        """TCP connections opened so far (1 while the server keeps the connection alive)."""

    @classmethod
    def to(cls, url: str) -> Connection:
        """A connection to ``http://host:port``."""
        host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
        return cls(host, int(port or 80))

    async def close(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.aclose()

    async def request(self, method: str, path: str, body: Any = None) -> Response:
        """Send a request (``body`` as JSON) and read the whole response."""
        parsed, parser, stream = await self._start(method, path, body, "application/json")
        while not parsed.done:
            await self._feed(stream, parser)
        await self._finish(parsed)
        return Response(parser.get_status_code(), b"".join(parsed.parts))

    async def stream(self, method: str, path: str, body: Any = None) -> AsyncIterator[tuple[float, Any]]:
        """Send a request and yield ``(time received, JSON of a data: line)`` for each SSE event,
        until the server ends the response; first ``(time the response head arrived, None)``.
        Raises ``HTTPStatusError`` unless the status is 200. Read it to its end: a stream left
        early leaves the connection closed."""
        parsed, parser, stream = await self._start(method, path, body, "text/event-stream")
        pending = b""
        opened = False
        try:
            while True:
                received = time.time()
                if parsed.head and not opened:
                    opened = True
                    if parser.get_status_code() != 200:
                        while not parsed.done:
                            await self._feed(stream, parser)
                        raise HTTPStatusError(
                            f"{method} {path}: {parser.get_status_code()} {b''.join(parsed.parts)[:300]!r}"
                        )
                    yield received, None
                if parsed.parts:
                    pending += b"".join(parsed.parts)
                    parsed.parts.clear()
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        if line.startswith(b"data:"):
                            yield received, json.loads(line[5:])
                if parsed.done:
                    break
                await self._feed(stream, parser)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.close()
            raise
        await self._finish(parsed)

    async def _start(
        self, method: str, path: str, body: Any, accept: str
    ) -> tuple[_Parsed, httptools.HttpResponseParser, anyio.abc.SocketStream]:
        """Send the request and read the first bytes of the answer. A kept-alive connection that
        the server closed meanwhile (uvicorn's idle timeout) fails before any byte comes back:
        the request then goes again on a new connection, as HTTP clients do."""
        for attempt in (1, 2):
            reused = self._stream is not None
            parsed = _Parsed()
            try:
                parser = await self._send(method, path, body, accept, parsed)
                stream = self._stream
                assert stream is not None
                await self._feed(stream, parser)
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self.close()
                if reused and attempt == 1:
                    continue
                raise
            return parsed, parser, stream
        raise AssertionError("unreachable")

    async def _send(
        self, method: str, path: str, body: Any, accept: str, parsed: _Parsed
    ) -> httptools.HttpResponseParser:
        if self._stream is None:
            self._stream = await anyio.connect_tcp(self.host, self.port)
            self.opened += 1
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAccept: {accept}\r\n"
        payload = b""
        if body is not None:
            payload = json.dumps(body, separators=(",", ":")).encode()
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        elif method in ("POST", "PUT"):
            head += "Content-Length: 0\r\n"
        await self._stream.send(head.encode() + b"\r\n" + payload)
        parser = parsed.parser = httptools.HttpResponseParser(parsed)
        return parser

    async def _feed(self, stream: anyio.abc.SocketStream, parser: httptools.HttpResponseParser) -> None:
        try:
            data = await stream.receive(READ_SIZE)
        except anyio.EndOfStream:
            await self.close()
            raise ConnectionError("the server closed the connection mid-response") from None
        parser.feed_data(data)

    async def _finish(self, parsed: _Parsed) -> None:
        if not parsed.keep_alive:
            await self.close()
