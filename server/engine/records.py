"""What the engine records about a run: node executions, the run's result, and the state a
resumed run starts from. Plain data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from server.status import NodeStatus, RunStatus

Usage = dict[str, int]
"""Token usage: ``{"prompt_tokens": .., "completion_tokens": .., "total_tokens": ..}``."""


def add_usage(total: Usage, more: Usage | None) -> Usage:
    """Sum two usage dicts key by key (returns ``total``, updated)."""
    for key, value in (more or {}).items():
        total[key] = total.get(key, 0) + int(value)
    return total


@dataclass(slots=True)
class NodeExecution:
    """One execution of one node: a row in the run's node list.

    Identified within a run by ``(node, iteration, index)``: ``iteration`` counts the node's loop
    passes from 0, ``index`` is the item index inside a ``map`` (None for the node as a whole;
    a mapped node has one row per item plus one with index None whose output is the list).
    """

    node: str
    iteration: int = 0
    index: int | None = None
    status: NodeStatus = NodeStatus.PENDING
    attempts: int = 0
    output: Any = None
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    usage: Usage | None = None

    @property
    def key(self) -> tuple[str, int, int | None]:
        return (self.node, self.iteration, self.index)

    @property
    def duration_ms(self) -> int | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return round((self.finished_at - self.started_at).total_seconds() * 1000)


@dataclass(slots=True)
class RunUpdate:
    """A change of the run's own state, recorded with ``workflow.started`` / ``workflow.finished``."""

    status: RunStatus
    at: datetime
    output: Any = None
    error: str | None = None
    usage: Usage = field(default_factory=dict[str, int])


@dataclass(slots=True)
class RunInfo:
    """The run the engine is asked to execute."""

    id: str
    graph: str
    version: int
    input: Any


@dataclass(slots=True)
class RunState:
    """What was already recorded for a run, so a resumed run continues from there.

    ``executions`` are the node executions that ended (succeeded, failed with ``on_error:
    continue``, skipped); ``last_seq`` is the sequence number of the last persisted event.
    """

    last_seq: int = 0
    started: bool = False
    executions: list[NodeExecution] = field(default_factory=list[NodeExecution])
