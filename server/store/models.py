"""The database tables (SQLModel) and the column types they share.

``SCHEMA_VERSION`` is the version of these tables; the store refuses to start on a database that
holds another version (see ``SqlStore.start``). Bump it with every change to a table.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Index,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

SCHEMA_VERSION = 1

#: Stored in ``node_executions.idx`` for the node as a whole (``index`` None): NULLs are all
#: distinct in a unique constraint, so None would let an upsert insert duplicates.
WHOLE_NODE = -1

JsonType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every database.

    SQLite stores no offset and aiosqlite returns naive datetimes: store UTC, read back as UTC.
    A naive datetime given to the store is taken to be UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class GraphRow(SQLModel, table=True):
    __tablename__ = "graphs"  # pyright: ignore[reportAssignmentType]  (sqlmodel#98)

    name: str = Field(primary_key=True, sa_type=String(64))
    version: int = Field(primary_key=True)
    spec: dict[str, Any] = Field(sa_type=JsonType)
    description: str | None = Field(default=None, sa_type=Text)
    nodes: int = 0
    created_at: datetime = Field(sa_type=UTCDateTime)


class RunRow(SQLModel, table=True):
    __tablename__ = "runs"  # pyright: ignore[reportAssignmentType]  (sqlmodel#98)
    __table_args__ = (
        UniqueConstraint("graph", "idempotency_key", name="uq_runs_graph_idempotency_key"),
        Index("ix_runs_graph_id", "graph", "id"),
        Index("ix_runs_status_id", "status", "id"),
        Index("ix_runs_created_at", "created_at"),
    )

    id: str = Field(primary_key=True, sa_type=String(36))
    graph: str = Field(sa_type=String(64))
    version: int
    status: str = Field(sa_type=String(16))
    input: Any = Field(default=None, sa_type=JsonType, nullable=True)
    output: Any = Field(default=None, sa_type=JsonType, nullable=True)
    error: str | None = Field(default=None, sa_type=Text)
    created_at: datetime = Field(sa_type=UTCDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    usage: dict[str, int] = Field(default_factory=dict[str, int], sa_type=JsonType)
    idempotency_key: str | None = Field(default=None, sa_type=String(255))
    last_seq: int = 0


class NodeRow(SQLModel, table=True):
    __tablename__ = "node_executions"  # pyright: ignore[reportAssignmentType]  (sqlmodel#98)
    __table_args__ = (UniqueConstraint("run_id", "node", "iteration", "idx", name="uq_node_executions_key"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="runs.id", ondelete="CASCADE", sa_type=String(36))
    node: str = Field(sa_type=String(64))
    iteration: int = 0
    idx: int = WHOLE_NODE
    status: str = Field(sa_type=String(16))
    attempts: int = 0
    output: Any = Field(default=None, sa_type=JsonType, nullable=True)
    error: str | None = Field(default=None, sa_type=Text)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    usage: dict[str, int] | None = Field(default=None, sa_type=JsonType)


class EventRow(SQLModel, table=True):
    """One event; ``gid`` (autoincrement, never reused) is the order of the global feed."""

    __tablename__ = "events"  # pyright: ignore[reportAssignmentType]  (sqlmodel#98)
    __table_args__ = (
        UniqueConstraint("run_id", "seq", name="uq_events_run_seq"),
        Index("ix_events_graph_gid", "graph", "gid"),
        {"sqlite_autoincrement": True},
    )

    # SQLite autoincrements only an INTEGER PRIMARY KEY (the rowid), Postgres gets a BIGINT.
    gid: int | None = Field(
        default=None, primary_key=True, sa_type=BigInteger().with_variant(Integer(), "sqlite")
    )
    run_id: str = Field(foreign_key="runs.id", ondelete="CASCADE", sa_type=String(36))
    seq: int
    type: str = Field(sa_type=String(32))
    graph: str = Field(sa_type=String(64))
    at: datetime = Field(sa_type=UTCDateTime)
    data: dict[str, Any] = Field(default_factory=dict[str, Any], sa_type=JsonType)


class SchemaVersionRow(SQLModel, table=True):
    __tablename__ = "schema_version"  # pyright: ignore[reportAssignmentType]  (sqlmodel#98)

    id: int = Field(default=1, primary_key=True)
    version: int


def table(model: type[SQLModel]) -> Table:
    """The Core table of a model (for bulk statements)."""
    return cast(Table, model.__table__)  # pyright: ignore[reportAttributeAccessIssue]


GRAPHS = table(GraphRow)
RUNS = table(RunRow)
NODES = table(NodeRow)
EVENTS = table(EventRow)
SCHEMA = table(SchemaVersionRow)
