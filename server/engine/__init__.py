"""The execution engine: runs validated graphs and records every step through a Recorder."""

from server.engine.context import NodeContext, Resources
from server.engine.engine import Engine, RunHandle, is_retryable
from server.engine.memory import MemoryRecorder
from server.engine.protocols import Recorder
from server.engine.records import NodeExecution, RunInfo, RunState, RunUpdate

__all__ = [
    "Engine",
    "MemoryRecorder",
    "NodeContext",
    "NodeExecution",
    "Recorder",
    "Resources",
    "RunHandle",
    "RunInfo",
    "RunState",
    "RunUpdate",
    "is_retryable",
]
