"""The Celery peer of ``bench.distributed``: one no-op task, chained three times by the client.

The worker runs as ``celery -A bench.celery_app worker``; BENCH_CELERY_URL names the Redis
database used as both broker and result backend.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

NOOP = "bench.noop"


def make_app(url: str) -> Celery:
    celery = Celery("braid_bench", broker=url, backend=url)
    celery.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return celery


app = make_app(os.environ.get("BENCH_CELERY_URL", "redis://127.0.0.1:6379/5"))


@app.task(name=NOOP)
def noop(value: Any = None) -> Any:
    return value
