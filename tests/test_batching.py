"""server.batching.GroupCommit: items queued together, written batch by batch in order."""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import anyio.lowlevel
import pytest

from server.batching import GroupCommit, Pending


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass(eq=False, slots=True, kw_only=True)
class Item(Pending):
    name: str


@pytest.mark.anyio
async def test_all_written_raises_an_earlier_batchs_error_though_the_last_batch_was_written() -> None:
    written: list[list[str]] = []

    async def write(batch: list[Item]) -> None:
        names = [item.name for item in batch]
        if "bad" in names:
            raise ConnectionError("the first batch failed")
        written.append(names)

    group = GroupCommit[Item](write, batch_size=2)
    items = [Item(name=name) for name in ("bad", "a", "b", "c")]
    group.queue.extend(items)
    with pytest.raises(ConnectionError, match="the first batch failed"), anyio.fail_after(5):
        await group.all_written(items)
    assert written == [["b", "c"]]  # the batches after the failed one were still written, in order
    assert all(item.done for item in items)


@pytest.mark.anyio
async def test_items_queued_during_a_write_are_written_next_by_the_same_writer_on_the_loop() -> None:
    """A burst's later callers queue while the first batch is written: the writer writes them at
    once, on the loop (``inline``), rather than waking one of them to take over behind every
    caller the first batch woke. It carries on for one batch only: what is queued during that
    one is handed over to its own caller."""
    writes: list[tuple[list[str], bool, str]] = []
    in_write = anyio.Event()
    release = {"a": anyio.Event(), "b": anyio.Event()}

    async def write(batch: list[Item]) -> None:
        names = [item.name for item in batch]
        task = anyio.get_current_task().name or ""
        writes.append((names, group.inline, task.rsplit(".", 1)[-1]))
        in_write.set()
        if names[0] in release:
            await release[names[0]].wait()

    # idle_lap=0: no trip round the loop counts as idle, so only a carried batch is inline.
    group = GroupCommit[Item](write, batch_size=10, idle_lap=0.0)

    async def submit(name: str) -> None:
        await group.submit(Item(name=name))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(submit, "a", name="a")
            await in_write.wait()
            in_write = anyio.Event()
            for name in ("b", "c"):  # queued while "a" is written
                tg.start_soon(submit, name, name=name)
            await wait_all_queued(group, 2)
            release["a"].set()
            await in_write.wait()  # the carried batch "b", "c" is being written
            tg.start_soon(submit, "d", name="d")
            await wait_all_queued(group, 1)
            release["b"].set()
    assert writes == [
        (["a"], False, "a"),
        (["b", "c"], True, "a"),  # by a's writer, on the loop
        (["d"], False, "d"),  # handed over: a's caller was held up by one batch only
    ]


async def wait_all_queued(group: GroupCommit[Item], count: int) -> None:
    """Until ``count`` callers wait in the queue (each queued task needs a turn of the loop)."""
    while sum(1 for item in group.queue if item.waiting) < count:
        await anyio.lowlevel.checkpoint()
