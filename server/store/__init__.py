"""Persistence: the ``Store`` protocol (``server.store.base``) and its SQL implementation
(``server.store.sql``, imported only where a store is built, so the rest need not load SQLAlchemy)."""

from server.store.base import GraphRecord, GraphSummary, RunRecord, Store

__all__ = ["GraphRecord", "GraphSummary", "RunRecord", "Store"]
