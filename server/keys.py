"""Every Redis key, stream and channel name Braid uses, in one place.

Each name starts with a prefix (``braid`` by default) so several deployments, or several test
runs, can share one Redis.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "braid"

RUNS = "runs"
"""The run queue: a stream of run ids read by the ``workers`` consumer group."""
DEAD_RUNS = "runs:dead"
"""Run queue messages given up on, with the reason."""
CANCEL = "cancel"
"""Pub/sub channel of run ids whose cancellation was asked."""
EVENTS = "events"
"""The global event feed (every run's events), trimmed to an approximate length."""

BUS_WAKE = "bus-wake:{token}"
"""A stream of one reader of an API process's event bus, added to so that the reader (blocked
in ``XREAD`` on the streams it follows) comes back and follows a new one too."""

RUN_ALIVE = "run:{run_id}:alive"
"""Set (with a time to live) while a worker executes the run, refreshed by its heartbeat: the
sweep never re-enqueues a run whose key exists."""
SWEEP = "sweep"
"""Held (with a time to live) by the worker that sweeps for lost runs this round."""

WORKER_GROUP = "workers"
"""The run queue's consumer group (a name inside the stream, not a key)."""


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = DEFAULT_PREFIX

    @property
    def runs(self) -> str:
        return f"{self.prefix}:{RUNS}"

    @property
    def dead_runs(self) -> str:
        return f"{self.prefix}:{DEAD_RUNS}"

    @property
    def cancel(self) -> str:
        return f"{self.prefix}:{CANCEL}"

    @property
    def events(self) -> str:
        return f"{self.prefix}:{EVENTS}"

    def run_events(self, run_id: str) -> str:
        """One run's event stream (expires a while after the run finished)."""
        return f"{self.prefix}:{EVENTS}:{run_id}"

    def bus_wake(self, token: str) -> str:
        """One event bus reader's wake-up stream (see ``BUS_WAKE``)."""
        return f"{self.prefix}:{BUS_WAKE.format(token=token)}"

    def run_alive(self, run_id: str) -> str:
        """Exists while a live worker executes ``run_id`` (see ``RUN_ALIVE``)."""
        return f"{self.prefix}:{RUN_ALIVE.format(run_id=run_id)}"

    @property
    def sweep(self) -> str:
        return f"{self.prefix}:{SWEEP}"

    @property
    def pattern(self) -> str:
        """A ``SCAN MATCH`` pattern for every key under this prefix."""
        return f"{self.prefix}:*"
