"""The events a run emits, as DESIGN.md lists them.

An event is ``{id, type, run_id, graph, at, ...fields}``. ``seq`` is the event's number within
its run (1, 2, 3, ... with no gaps) and is what a run's SSE stream sends as ``id:``; ``gid`` is
the event's position in the global feed, assigned by the store when the event is persisted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from server.status import EventType


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class Event:
    run_id: str
    seq: int
    type: EventType
    graph: str
    data: dict[str, Any] = field(default_factory=dict[str, Any])
    at: datetime = field(default_factory=utcnow)
    gid: int | None = None

    def as_json(self) -> dict[str, Any]:
        """The event as its clients see it (``id`` is the per-run sequence number)."""
        return {
            "id": self.seq,
            "type": str(self.type),
            "run_id": self.run_id,
            "graph": self.graph,
            "at": self.at.isoformat(),
            **self.data,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], gid: int | None = None) -> Event:
        data = {k: v for k, v in obj.items() if k not in ("id", "type", "run_id", "graph", "at")}
        return cls(
            run_id=obj["run_id"],
            seq=int(obj["id"]),
            type=EventType(obj["type"]),
            graph=obj["graph"],
            data=data,
            at=datetime.fromisoformat(obj["at"]),
            gid=gid,
        )
