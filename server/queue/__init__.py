"""The run queue: ``MemoryQueue`` (embedded) and ``RedisQueue`` (distributed, imported from
``server.queue.redis`` so the embedded mode never imports redis)."""

from server.queue.base import Delivery, RunQueue
from server.queue.memory import MemoryQueue

__all__ = ["Delivery", "MemoryQueue", "RunQueue"]
