"""The garbage collector of a serving process (``braid serve``, ``braid worker``).

A burst of runs keeps tens of thousands of objects alive at once (tasks, coroutines, events,
frames). With CPython's default thresholds (a young collection every 700 new containers) each of
them is walked by several young collections before it dies, and the full collections that follow
walk everything the process made since start-up: on the streaming benchmark, 160 to 250 ms of
collection in 10 bursts of 60 streamed runs, with single pauses of 17 to 42 ms landing inside a
burst. What start-up made (modules, the app, the open Braid) is frozen out of the collector's
reach once the process is ready (``freeze``), and a young collection waits for
``YOUNG_THRESHOLD`` new containers (``tune``), so most of a run's objects are freed by their
reference counts before any collection sees them: 65 to 70 ms in all, pauses of 2 to 10 ms.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000
"""New containers between young collections (CPython's default: 700)."""


def freeze() -> None:
    """Collect, then move every object alive now (modules, classes, the app, the open Braid) out
    of the collector's reach: a full collection then walks only what serving made since. Called
    once the process opened what it serves with."""
    gc.collect()
    gc.freeze()


def tune() -> None:
    """Young collections every ``YOUNG_THRESHOLD`` new containers."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
