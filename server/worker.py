"""``braid worker``: execute runs taken from Redis until told to stop (distributed mode).

On SIGTERM or SIGINT the worker takes no more runs and lets the ones in flight finish for up to
``grace`` seconds; whatever is still running then is left unacknowledged, so another worker
reclaims it and resumes it from its persisted node results. A second signal stops at once.
Every worker also sweeps, in turn with the others, for runs whose queue message was lost.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator

import anyio

from server import collector
from server.braid import open_braid
from server.config import Settings
from server.errors import SettingsError
from server.queue.redis import RedisQueue
from server.sweep import Sweeper

log = logging.getLogger("braid.worker")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _describe_database(url: str) -> str:
    return "SQLite" if url.startswith("sqlite") else f"PostgreSQL {url.split('@', 1)[-1]}"


async def _stop_on_signal(signals: AsyncIterator[int], scope: anyio.CancelScope) -> None:
    async for signum in signals:
        print(f"Braid worker: {signal.Signals(signum).name} again, stopping now", flush=True)
        scope.cancel()
        return


async def run_worker(settings: Settings, *, grace: float = 30.0) -> None:
    """Run a worker process until SIGTERM/SIGINT, then drain for up to ``grace`` seconds."""
    if not settings.distributed:
        raise SettingsError(
            "a worker takes runs from Redis: set BRAID_REDIS_URL (and BRAID_DATABASE_URL="
            "postgresql+asyncpg://...)"
        )
    # Timestamped warnings (lost runs, reconnections) and Braid's own notices; quiet libraries.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("braid").setLevel(logging.INFO)
    with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with open_braid(settings, workers=True) as braid:
            collector.freeze()  # start-up's objects, and what opening the Braid made
            runner = braid.runner
            assert runner is not None  # open_braid(workers=True) always starts one
            async with anyio.create_task_group() as tg:
                if isinstance(braid.queue, RedisQueue):
                    await tg.start(Sweeper.paced_by(braid.store, braid.queue).serve)
                print(
                    f"Braid worker: {_describe_database(settings.database_url)}, redis prefix "
                    f"{settings.redis_prefix!r}, {settings.worker_concurrency} runs at once; Ctrl-C to stop",
                    flush=True,
                )
                async for signum in signals:
                    print(
                        f"Braid worker: {signal.Signals(signum).name}, stopping: taking no more runs, "
                        f"waiting up to {grace:g}s for the {len(runner.handles)} running",
                        flush=True,
                    )
                    break
                tg.cancel_scope.cancel()  # stop sweeping
            drained = False
            async with anyio.create_task_group() as tg:
                tg.start_soon(_stop_on_signal, signals, tg.cancel_scope)
                drained = await runner.drain(grace)
                tg.cancel_scope.cancel()
            left = len(runner.handles)
            if left:
                print(f"Braid worker: leaving {left} unfinished runs to other workers", flush=True)
            elif drained:
                print("Braid worker: all runs finished, stopped", flush=True)
