"""Graphs: the document format, its validation and the validated model.

``parse`` and ``model`` import ``agents.registry``, which itself imports this package (through
the node context), so they are loaded on first use rather than here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from server.graph.expressions import Expression, Template
from server.graph.fields import ExpressionField, TemplateField, TemplateTreeField, ValidationContext

if TYPE_CHECKING:
    from server.graph.model import Edge, Graph, Node, RetryPolicy
    from server.graph.parse import build_graph, load_document, parse_graph

_LAZY = {
    "Edge": "server.graph.model",
    "Graph": "server.graph.model",
    "Node": "server.graph.model",
    "RetryPolicy": "server.graph.model",
    "build_graph": "server.graph.parse",
    "load_document": "server.graph.parse",
    "parse_graph": "server.graph.parse",
}

__all__ = [
    "Edge",
    "Expression",
    "ExpressionField",
    "Graph",
    "Node",
    "RetryPolicy",
    "Template",
    "TemplateField",
    "TemplateTreeField",
    "ValidationContext",
    "build_graph",
    "load_document",
    "parse_graph",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
