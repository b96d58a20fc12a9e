"""Records as the JSON the API answers with (DESIGN.md, "HTTP API")."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from server.engine.records import NodeExecution
from server.store.base import GraphRecord, GraphSummary, RunRecord


def timestamp(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def graph(record: GraphRecord) -> dict[str, Any]:
    """One version of a graph, spec included (``GET /graphs/{name}``, and the answer to storing one)."""
    return {
        "name": record.name,
        "version": record.version,
        "description": record.description,
        "nodes": record.nodes,
        "created_at": timestamp(record.created_at),
        "spec": record.spec,
    }


def graph_version(record: GraphRecord) -> dict[str, Any]:
    """One entry of ``GET /graphs/{name}/versions`` (no spec)."""
    return {
        "name": record.name,
        "version": record.version,
        "description": record.description,
        "nodes": record.nodes,
        "created_at": timestamp(record.created_at),
    }


def graph_summary(summary: GraphSummary) -> dict[str, Any]:
    """One entry of ``GET /graphs``."""
    last = summary.last_run
    return {
        "name": summary.name,
        "version": summary.version,
        "description": summary.description,
        "nodes": summary.nodes,
        "created_at": timestamp(summary.created_at),
        "last_run": None
        if last is None
        else {
            "id": last.id,
            "status": str(last.status),
            "created_at": timestamp(last.created_at),
            "finished_at": timestamp(last.finished_at),
        },
    }


def run_summary(run: RunRecord) -> dict[str, Any]:
    """One entry of ``GET /runs``."""
    return {
        "id": run.id,
        "graph": run.graph,
        "version": run.version,
        "status": str(run.status),
        "error": run.error,
        "created_at": timestamp(run.created_at),
        "started_at": timestamp(run.started_at),
        "finished_at": timestamp(run.finished_at),
        "duration_ms": run.duration_ms,
        "usage": dict(run.usage),
    }


def node_execution(execution: NodeExecution) -> dict[str, Any]:
    return {
        "node": execution.node,
        "status": str(execution.status),
        "iteration": execution.iteration,
        "index": execution.index,
        "attempts": execution.attempts,
        "output": execution.output,
        "error": execution.error,
        "started_at": timestamp(execution.started_at),
        "finished_at": timestamp(execution.finished_at),
        "duration_ms": execution.duration_ms,
        "usage": dict(execution.usage or {}),
    }


def pending_node(node: str) -> dict[str, Any]:
    """A node of the run's graph that has not executed (yet)."""
    return {
        "node": node,
        "status": "pending",
        "iteration": 0,
        "index": None,
        "attempts": 0,
        "output": None,
        "error": None,
        "started_at": None,
        "finished_at": None,
        "duration_ms": None,
        "usage": {},
    }


def run(record: RunRecord, nodes: list[NodeExecution], graph_nodes: Iterable[str] = ()) -> dict[str, Any]:
    """A run with its node executions (``GET /runs/{id}``, and every answer that returns a run),
    then every node of its graph that has not executed as ``pending``, in declaration order."""
    executed = {n.node for n in nodes}
    return {
        "id": record.id,
        "graph": record.graph,
        "version": record.version,
        "status": str(record.status),
        "input": record.input,
        "output": record.output,
        "error": record.error,
        "idempotency_key": record.idempotency_key,
        "created_at": timestamp(record.created_at),
        "started_at": timestamp(record.started_at),
        "finished_at": timestamp(record.finished_at),
        "duration_ms": record.duration_ms,
        "usage": dict(record.usage),
        "nodes": [node_execution(n) for n in nodes]
        + [pending_node(node) for node in graph_nodes if node not in executed],
    }
