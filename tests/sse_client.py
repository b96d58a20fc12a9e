"""A small Server-Sent Events reader over httpx for tests: frames as the spec parses them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import httpx


@dataclass(frozen=True, slots=True)
class Frame:
    """One dispatched SSE message (``event`` defaults to "message"), or a comment line when
    ``comment`` is set (only yielded when asked for)."""

    event: str = "message"
    data: str = ""
    id: str | None = None
    comment: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


async def iter_frames(response: httpx.Response, *, comments: bool = False) -> AsyncIterator[Frame]:
    """The frames of an open streaming response, until the server closes it."""
    event: str | None = None
    data: list[str] = []
    frame_id: str | None = None
    async for line in response.aiter_lines():
        if line == "":
            if data or event is not None or frame_id is not None:
                yield Frame(event=event or "message", data="\n".join(data), id=frame_id)
            event, data, frame_id = None, [], None
            continue
        if line.startswith(":"):
            if comments:
                yield Frame(event="", comment=line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id":
            frame_id = value
    if data or event is not None:
        yield Frame(event=event or "message", data="\n".join(data), id=frame_id)


async def read_frames(
    client: httpx.AsyncClient,
    url: str,
    *,
    params: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    until: Callable[[Frame], bool] | None = None,
    within: float = 15.0,
) -> list[Frame]:
    """Open ``url`` as an SSE stream and collect its frames until the server closes it, or until
    ``until`` is true for a frame (then disconnect). Fails after ``within`` seconds."""
    frames: list[Frame] = []
    with anyio.fail_after(within):
        async with client.stream(
            "GET", url, params=params, headers={"Accept": "text/event-stream", **(headers or {})}
        ) as response:
            assert response.status_code == 200, (response.status_code, await response.aread())
            assert response.headers["content-type"].startswith("text/event-stream")
            async for frame in iter_frames(response):
                frames.append(frame)
                if until is not None and until(frame):
                    break
    return frames
