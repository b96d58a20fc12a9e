"""Braid's agent kinds (node kinds) and their registry."""

from agents.registry import AgentConfig, AgentKind, Registry, agent, default_registry
from server.engine.context import NodeContext, Resources
from server.graph.fields import ExpressionField, TemplateField, TemplateTreeField

__all__ = [
    "AgentConfig",
    "AgentKind",
    "ExpressionField",
    "NodeContext",
    "Registry",
    "Resources",
    "TemplateField",
    "TemplateTreeField",
    "agent",
    "default_registry",
]
