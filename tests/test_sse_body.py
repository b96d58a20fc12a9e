"""The SSE response body (``server.api.events.Body``): frames queued together reach the client
in one write, in order; a sender waits while the client is behind; a closed body ends after
what it holds."""

from __future__ import annotations

import anyio
import pytest
from sse_starlette import ServerSentEvent
from sse_starlette.sse import SendTimeoutError

from server.api.events import Body, Frames, _sse

pytestmark = pytest.mark.anyio


def frame(n: int, size: int = 10) -> ServerSentEvent:
    return ServerSentEvent("x" * size, event="node.completed", id=str(n))


async def test_frames_queued_together_come_out_as_one_chunk_in_order() -> None:
    body = Body()
    frames = [frame(n) for n in range(1, 6)]
    for f in frames:
        body.send_nowait(f)
    chunk = await anext(body)
    assert chunk == b"".join(f.encode() for f in frames)
    body.send_nowait(frame(6))
    assert await anext(body) == frame(6).encode()


async def test_a_waiting_response_gets_the_frames_sent_after_it_asked() -> None:
    body = Body()
    got: list[bytes] = []

    async def response() -> None:
        got.append(await anext(body))

    async with anyio.create_task_group() as tg:
        tg.start_soon(response)
        await anyio.wait_all_tasks_blocked()
        assert got == []
        body.send_nowait(frame(1))
        body.send_nowait(frame(2))
    assert got == [frame(1).encode() + frame(2).encode()]


async def test_a_sender_waits_while_the_body_is_full_and_goes_on_once_the_client_took_it() -> None:
    body = Body(limit=100)
    body.send_nowait(frame(1, size=120))  # one frame may exceed the limit by itself
    with pytest.raises(anyio.WouldBlock):
        body.send_nowait(frame(2))
    sent = anyio.Event()

    async def sender() -> None:
        await body.send(frame(2))
        sent.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(sender)
        await anyio.wait_all_tasks_blocked()
        assert not sent.is_set()
        assert await anext(body) == frame(1, size=120).encode()
        with anyio.fail_after(5):
            await sent.wait()
    assert await anext(body) == frame(2).encode()


async def test_a_closed_body_ends_after_the_frames_it_holds() -> None:
    body = Body()
    body.send_nowait(frame(1))
    body.close()
    with pytest.raises(anyio.ClosedResourceError):
        body.send_nowait(frame(2))
    assert [chunk async for chunk in body] == [frame(1).encode()]


async def test_closing_wakes_a_waiting_response() -> None:
    body = Body()
    chunks: list[bytes] = []

    async def response() -> None:
        chunks.extend([chunk async for chunk in body])

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(response)
            await anyio.wait_all_tasks_blocked()
            body.close()
    assert chunks == []


async def test_closing_wakes_a_waiting_sender() -> None:
    body = Body(limit=1)
    body.send_nowait(frame(1))
    outcome: list[str] = []

    async def sender() -> None:
        try:
            await body.send(frame(2))
        except anyio.ClosedResourceError:
            outcome.append("sender: closed")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(sender)
            await anyio.wait_all_tasks_blocked()
            body.close()
    assert outcome == ["sender: closed"]
    assert [chunk async for chunk in body] == [frame(1).encode()]


async def test_a_stream_whose_client_takes_nothing_ends_on_the_send_timeout_even_at_its_last_send(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once a run's last event is in the client's buffers, sse-starlette's closing send (``more_body:
    False``) waits for the client like any other; a client that takes nothing must not hold the
    stream (its tasks, its subscription) past the send timeout there either."""
    monkeypatch.setenv("BRAID_SSE_SEND_TIMEOUT", "0.2")
    sent: list[dict[str, object]] = []

    async def produce(out: Frames) -> None:
        await out.send(frame(1))  # the run's last event: then the stream closes

    async def receive() -> dict[str, object]:
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, object]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            await anyio.sleep_forever()  # the client's window is shut: the write never drains

    response = _sse(produce, ping=0)
    scope = {"type": "http", "method": "GET"}
    with anyio.fail_after(5), pytest.raises(SendTimeoutError):
        await response(scope, receive, send)  # pyright: ignore[reportArgumentType]
    assert [m.get("body") for m in sent if m["type"] == "http.response.body"] == [frame(1).encode(), b""]
