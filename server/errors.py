"""Braid's errors: setup errors (a bad graph, a bad setting) and runtime errors (a node or a run
that fails). The API maps them to status codes in one place (``server/api/errors.py``)."""

from __future__ import annotations

from dataclasses import dataclass


class BraidError(Exception):
    """Base of every error Braid raises on purpose."""


# --- setup errors ------------------------------------------------------------------------------


class SetupError(BraidError):
    """Something is wrong before anything runs: a setting, a graph, an input."""


class SettingsError(SetupError):
    """A setting from the environment has a wrong value; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem found while validating, with the dotted path to where it is."""

    path: str
    message: str

    def as_json(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}


class ValidationFailed(SetupError):
    """A graph or a run input is invalid; ``problems`` lists every problem with its path."""

    def __init__(self, problems: list[Problem], what: str = "graph") -> None:
        self.problems = problems
        self.what = what
        summary = "; ".join(f"{p.path or '<root>'}: {p.message}" for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"invalid {what}: {summary}{more}")


class NotFound(BraidError):
    """A graph, version or run that does not exist."""


class Conflict(BraidError):
    """The request conflicts with the current state (a name taken, a run already ended)."""


class Unavailable(BraidError):
    """A service Braid needs (Redis) cannot be reached right now; the same request may succeed
    shortly."""


# --- runtime errors ----------------------------------------------------------------------------


class NodeError(BraidError):
    """A node attempt failed. ``retryable`` says whether another attempt may succeed."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class RetryableError(NodeError):
    """A transient failure: a timeout, a connection error, a 429/5xx, an unparsable reply."""

    retryable = True


class ExpressionError(NodeError):
    """A template or expression failed to compile or to evaluate."""


class RunFailed(BraidError):
    """The run cannot go on (``max_steps`` exceeded, the output expression failed, ...)."""
