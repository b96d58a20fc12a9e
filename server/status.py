"""Run and node statuses and event types: one enum each, used unchanged by the database
columns, the JSON, the SSE ``event:`` names and the dashboard badges."""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)


class NodeStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in (NodeStatus.SUCCEEDED, NodeStatus.FAILED, NodeStatus.SKIPPED, NodeStatus.CANCELLED)


class EventType(StrEnum):
    WORKFLOW_STARTED = "workflow.started"
    NODE_STARTED = "node.started"
    NODE_DELTA = "node.delta"
    NODE_RETRYING = "node.retrying"
    NODE_COMPLETED = "node.completed"
    NODE_FAILED = "node.failed"
    NODE_SKIPPED = "node.skipped"
    WORKFLOW_FINISHED = "workflow.finished"


#: Event types of the global feed (``GET /events``) unless deltas are asked for.
LIFECYCLE_EVENTS = frozenset(EventType) - {EventType.NODE_DELTA}
