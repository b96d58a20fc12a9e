"""The event bus: ``MemoryBus`` (embedded) and ``RedisBus`` (distributed, imported from
``server.bus.redis`` so the embedded mode never imports redis)."""

from server.bus.base import EventBus, SubscriberTooSlow, Subscription
from server.bus.memory import MemoryBus

__all__ = ["EventBus", "MemoryBus", "SubscriberTooSlow", "Subscription"]
