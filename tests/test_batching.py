"""server.batching.GroupCommit: items queued together, written batch by batch in order."""

from __future__ import annotations

from dataclasses import dataclass

import anyio
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
