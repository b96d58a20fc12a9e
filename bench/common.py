"""What the benchmarks share: graph shapes, a no-op agent kind, tables, percentiles, services and
child processes (``braid serve``, ``braid worker``, ``celery worker``)."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

from agents.registry import AgentConfig, AgentKind, Registry, default_registry
from server.engine.context import NodeContext

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
POSTGRES_URL = os.environ.get("BRAID_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BRAID_BENCH_REDIS_URL", "redis://127.0.0.1:6379")
"""The Redis server, without a database number: each benchmark takes an empty database of its own."""

CLEARED_ENV = (
    "BRAID_DATABASE_URL",
    "BRAID_REDIS_URL",
    "BRAID_AGENT_MODULES",
    "BRAID_PROVIDERS",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
)
PACKAGES = ("langgraph", "langgraph-checkpoint", "langchain-core", "celery", "redis", "anyio", "sqlalchemy")


class Skipped(Exception):
    """A benchmark cannot run here (a service is missing): ``python -m bench`` goes on without it."""


# --- graphs ------------------------------------------------------------------------------------


async def _noop(config: AgentConfig, ctx: NodeContext) -> None:
    return None


NOOP = AgentKind("noop", AgentConfig, _noop)
"""An agent kind that does nothing: what is left of a node's cost is the engine's."""


def registry() -> Registry:
    """The built-in kinds plus ``noop``."""
    reg = default_registry()
    reg.add(NOOP)
    return reg


def chain_spec(name: str, length: int, node: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``n0 -> n1 -> ... -> n{length-1}``."""
    nodes = {f"n{i}": dict(node or {"agent": "noop"}) for i in range(length)}
    edges = [{"from": f"n{i}", "to": f"n{i + 1}"} for i in range(length - 1)]
    return {"name": name, "max_steps": length + 10, "nodes": nodes, "edges": edges}


def fanout_spec(name: str, width: int, branch: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``source -> b0..b{width-1} -> join``, every branch running at once (concurrency = width)."""
    branches = [f"b{i}" for i in range(width)]
    nodes: dict[str, Any] = {"source": {"agent": "noop"}}
    nodes.update({b: dict(branch or {"agent": "noop"}) for b in branches})
    nodes["join"] = {"agent": "noop"}
    edges = [{"from": "source", "to": branches}, {"from": branches, "to": "join"}]
    return {"name": name, "max_steps": width + 10, "concurrency": width, "nodes": nodes, "edges": edges}


# --- numbers and tables ------------------------------------------------------------------------


async def take_turns(
    runs: Mapping[str, Callable[[], Awaitable[None]]], reps: int, *, warm_up: bool = True
) -> dict[str, list[float]]:
    """The wall times of ``reps`` runs of each of ``runs``, in seconds (after one warm-up run
    each with ``warm_up``). The engines take turns (one run of each, then again), so a slower
    spell of the machine falls on every engine alike. As ``braid serve`` and ``braid worker`` do
    at start (server/collector.py), what start-up made is frozen out of the collector's reach; before
    each timed run, for every engine alike, the previous run's garbage is collected."""
    gc.collect()
    gc.freeze()
    if warm_up:
        for run in runs.values():
            await run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            gc.collect()
            began = time.perf_counter()
            await run()
            times[name].append(time.perf_counter() - began)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, every thread) a process has used so far; None where /proc does
    not tell (not Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.{digits}f}"
    return str(value)


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table (first column left-aligned, the others right-aligned)."""
    cells = [list(headers), *[[fmt(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))]
        return "  ".join(parts).rstrip()

    out = [title, line(cells[0]), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in cells[1:])
    return "\n".join(out)


def environment() -> dict[str, Any]:
    """The machine and the versions the figures were measured with."""
    versions: dict[str, str | None] = {}
    for name in ("braid", *PACKAGES):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cores": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": versions,
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --- services and processes --------------------------------------------------------------------


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def token() -> str:
    return secrets.token_hex(4)


def child_env(**extra: str) -> dict[str, str]:
    """This environment without Braid's service settings, plus ``extra``, with the repository on
    the import path."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Child:
    """A child process whose output goes to a log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self, tail: int = 3000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-tail:]
        except OSError:
            return ""

    def check(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def children() -> Iterator[list[Child]]:
    """A list to ``spawn`` into; every child still running at the end is stopped."""
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in reversed(started):
            child.stop()


def spawn(
    started: list[Child], name: str, args: Sequence[str], folder: Path, env: Mapping[str, str]
) -> Child:
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / f"{name}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, *args], cwd=folder, env=dict(env), stdout=log_file, stderr=subprocess.STDOUT
        )
    child = Child(name, process, log_path)
    started.append(child)
    return child


def wait_healthy(url: str, watched: Sequence[Child], timeout: float = 60.0) -> dict[str, Any]:
    """Poll ``{url}/health`` until it says ok, failing early if a watched process dies."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        for child in watched:
            child.check()
        try:
            response = httpx.get(f"{url}/health", timeout=2)
            if response.status_code == 200:
                return dict(response.json())
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = str(exc) or type(exc).__name__
        time.sleep(0.2)
    logs = "\n".join(f"--- {c.name}\n{c.log()}" for c in watched)
    raise RuntimeError(f"{url}/health was not ok within {timeout:g}s ({last}):\n{logs}")
