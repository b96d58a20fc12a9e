"""The sweep for lost runs (distributed mode): a run the API accepted is never silently lost.

The database is the source of truth, the stream only carries run ids. Should a run's message go
missing — Redis restarted without its data, or the API stored a run but could not enqueue it —
a sweep, run by one worker at a time every few seconds, finds the runs that still need executing
and enqueues them again:

* a ``queued`` run older than ``stale_after`` whose message is in neither the stream nor the
  pending list, and no live worker is on it;
* a ``running`` run with the same, whose latest event is older than ``stale_after``: its worker
  died and its pending entry went with Redis's data (while the entry exists, ``XAUTOCLAIM`` hands
  it to another worker instead).

A live worker refreshes its run's "alive" key with every heartbeat, so a run is never enqueued
twice while it executes: a run that looks lost is looked at again one heartbeat later (after a
Redis restart, the keys of live workers come back with their next beat). Enqueueing a run that
ended meanwhile is harmless: the worker that takes it finds it ended and drops the message.
"""

from __future__ import annotations

import logging
import random
from datetime import datetime, timedelta

import anyio
import anyio.abc

from server.errors import NotFound
from server.events import utcnow
from server.queue.redis import RedisQueue
from server.runner import HEARTBEAT_SECONDS
from server.status import RunStatus
from server.store.base import RunRecord, Store

log = logging.getLogger("braid.sweep")


class Sweeper:
    """Re-enqueues lost runs; see the module docstring.

    Args:
        store: the database.
        queue: the Redis run queue.
        interval: seconds between sweeps (each wait jittered by ±20%).
        stale_after: seconds a run must have gone without progress before it counts as lost.
        confirm_after: seconds to wait before looking again at runs that look lost (longer than
            the workers' heartbeat interval).
        backoff_cap: the longest wait, in seconds, after a sweep failed.
    """

    def __init__(
        self,
        store: Store,
        queue: RedisQueue,
        *,
        interval: float = 10.0,
        stale_after: float = 60.0,
        confirm_after: float = 6.0,
        backoff_cap: float = 30.0,
    ) -> None:
        self.store = store
        self.queue = queue
        self.interval = interval
        self.stale_after = stale_after
        self.confirm_after = confirm_after
        self.backoff_cap = backoff_cap

    @classmethod
    def paced_by(cls, store: Store, queue: RedisQueue) -> Sweeper:
        """A sweeper paced by the queue's reclaim idle limit, as the runner's heartbeat is: a sweep
        every third of it (at most every 10 s), a run lost after twice it without progress."""
        idle = queue.idle_ms / 1000
        heartbeat = min(HEARTBEAT_SECONDS, idle / 3)
        return cls(
            store,
            queue,
            interval=min(10.0, max(0.5, idle / 3)),
            stale_after=max(1.0, 2 * idle),
            confirm_after=heartbeat + 1.0,
        )

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Sweep every ``interval`` seconds until cancelled; a failed sweep is logged, never fatal."""
        task_status.started()
        failures = 0
        while True:
            await anyio.sleep(self.interval * random.uniform(0.8, 1.2))
            try:
                if await self.queue.lead_sweep(self.interval * 0.8):
                    await self.sweep()
            except Exception as exc:
                failures += 1
                delay = min(self.backoff_cap, self.interval * 2 ** min(failures, 8))
                log.warning("sweep for lost runs failed (%s); next try in %.1fs", exc, delay)
                await anyio.sleep(delay)
            else:
                failures = 0

    async def sweep(self) -> list[str]:
        """Enqueue the lost runs again; their ids."""
        cutoff = utcnow() - timedelta(seconds=self.stale_after)
        candidates = [
            run.id
            for run in await self.store.runs_with_status(RunStatus.QUEUED, RunStatus.RUNNING)
            if run.created_at < cutoff
        ]
        lost = await self._lost(candidates, cutoff)
        if not lost:
            return []
        if self.confirm_after > 0:
            # Keep the lead for the whole sweep, so no other worker enqueues these runs too.
            if not await self.queue.keep_sweep(self.confirm_after + 10.0):
                return []
            await anyio.sleep(self.confirm_after)  # let live workers beat once more
            lost = await self._lost(lost, cutoff)
        for run_id in lost:
            log.warning("run %s has no message in the run queue; enqueueing it again", run_id)
            await self.queue.enqueue(run_id)
        if self.confirm_after > 0:
            await self.queue.keep_sweep(self.interval * 0.8)  # back to the usual pace
        return lost

    async def _lost(self, run_ids: list[str], cutoff: datetime) -> list[str]:
        """Those of ``run_ids`` with no message in the stream, no live worker on them, and no
        progress since ``cutoff``."""
        if not run_ids:
            return []
        in_queue = await self.queue.queued_run_ids()
        unqueued = [run_id for run_id in run_ids if run_id not in in_queue]
        alive = await self.queue.alive_run_ids(unqueued)
        lost: list[str] = []
        for run_id in unqueued:
            if run_id in alive:
                continue
            try:
                run = await self.store.get_run(run_id)  # fresh: it may have moved on meanwhile
            except NotFound:
                continue
            if not run.status.ended and await self._last_activity(run) < cutoff:
                lost.append(run_id)
        return lost

    async def _last_activity(self, run: RunRecord) -> datetime:
        if run.last_seq == 0:
            return run.created_at
        events = await self.store.events(run.id, after=run.last_seq - 1, limit=1)
        return events[-1].at if events else run.created_at
