"""The ``braid`` command: ``serve``, ``worker``, ``push``, ``validate``, ``run``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import httpx

from server import collector
from server.config import Settings, check_folders
from server.errors import SettingsError, ValidationFailed

if TYPE_CHECKING:
    from agents.registry import Registry

CLIENT_TIMEOUT = httpx.Timeout(30.0, read=None)
WAIT_CHUNK_SECONDS = 300
POLL_SECONDS = 0.3


class CommandFailed(Exception):
    """Stop the command: print ``message`` to stderr and exit with ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# --- serve and worker ------------------------------------------------------------------------


def load_settings() -> Settings:
    try:
        settings = Settings.from_env()
        check_folders()
        return settings
    except SettingsError as exc:
        raise CommandFailed(str(exc), 2) from None


def load_registry(settings: Settings) -> Registry:
    """The agent kinds, BRAID_AGENT_MODULES imported now: a module that cannot be imported is one
    line at start, not a traceback out of the server's startup."""
    from agents.registry import default_registry

    try:
        return default_registry(settings.agent_modules)
    except SettingsError as exc:
        raise CommandFailed(str(exc), 2) from None


def describe_database(url: str) -> str:
    if url.startswith("sqlite"):
        return f"SQLite {url.split(':///', 1)[-1] or ':memory:'}"
    host = url.split("@", 1)[-1]  # never print the password
    return f"PostgreSQL {host}"


def banner(settings: Settings, workers: bool) -> str:
    mode = "distributed" if settings.distributed else "embedded"
    if not workers:
        mode += ", no workers"
    model = (
        "offline mock model"
        if settings.use_mock_model
        else f"model at {settings.openai_base_url or 'OpenAI'}"
    )
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host
    database = describe_database(settings.database_url)
    return f"Braid on http://{host}:{settings.port} ({mode}, {database}, {model})"


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.api.app import create_app

    settings = load_settings()
    load_registry(settings)
    settings = dataclasses.replace(
        settings,
        host=args.host or settings.host,
        port=settings.port if args.port is None else args.port,
    )
    workers = (not settings.distributed) if args.workers is None else bool(args.workers)
    print(banner(settings, workers), flush=True)
    app = create_app(settings, workers=workers)
    # Start-up's objects out of the collector's reach once the app has started: the modules, the
    # app and what opening the Braid made (connections, caches, modules imported on first use).
    app.on_startup.append(collector.freeze)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        # No line per request (every API call, SSE client and dashboard fragment): as with the
        # HTTP clients' logs (server.api.app), it would drown Braid's own notices.
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again: make that a clean exit.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    collector.tune()
    server.run()
    return 0 if server.started else 1


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


async def _work(settings: Settings) -> None:
    from server.worker import run_worker

    await run_worker(settings)


def worker(args: argparse.Namespace) -> int:
    import anyio

    settings = load_settings()
    if not settings.distributed:
        raise CommandFailed(
            "braid worker takes runs from Redis: set BRAID_REDIS_URL (and BRAID_DATABASE_URL="
            "postgresql+asyncpg://...). In embedded mode `braid serve` runs the runs itself.",
            2,
        )
    load_registry(settings)
    # uvloop when installed (uvicorn's standard extra brings it), as `braid serve` runs on it:
    # a worker's time is mostly event-loop work (Redis, Postgres, the engine's tasks).
    collector.tune()
    anyio.run(_work, settings, backend_options={"use_uvloop": importlib.util.find_spec("uvloop") is not None})
    return 0


# --- validate (local) ------------------------------------------------------------------------


def content_type_of(path: Path) -> str:
    return "application/json" if path.suffix.lower() == ".json" else "application/yaml"


def read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CommandFailed(f"cannot read {path}: {exc.strerror or exc}", 2) from None


def validate(args: argparse.Namespace) -> int:
    from server.graph.fields import ValidationContext
    from server.graph.parse import build_graph, load_document

    settings = load_settings()
    path = Path(args.file)
    text = read_file(path)
    registry = load_registry(settings)
    try:
        spec = load_document(text, content_type_of(path))
        graph = build_graph(spec, registry, ValidationContext(prompts_dir=settings.prompts_dir))
    except ValidationFailed as exc:
        print(f"{path}: invalid ({len(exc.problems)} problem{'s' if len(exc.problems) != 1 else ''})")
        for problem in exc.problems:
            print(f"  {problem.path or '<root>'}: {problem.message}")
        return 1
    print(f"valid: {graph.name} ({len(graph.nodes)} nodes)")
    return 0


# --- the HTTP client commands ----------------------------------------------------------------


def default_server() -> str:
    host = os.environ.get("BRAID_HOST", "").strip() or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    port = os.environ.get("BRAID_PORT", "").strip() or "8000"
    return f"http://{host}:{port}"


def client(server: str) -> httpx.Client:
    return httpx.Client(base_url=server.rstrip("/"), timeout=CLIENT_TIMEOUT)


def request(http: httpx.Client, method: str, url: str, **kwargs: Any) -> httpx.Response:
    try:
        return http.request(method, url, **kwargs)
    except httpx.ConnectError:
        raise CommandFailed(f"cannot reach Braid at {http.base_url}: is `braid serve` running?", 2) from None
    except httpx.HTTPError as exc:
        raise CommandFailed(f"{method} {url} failed: {exc}", 2) from None


def fail(response: httpx.Response) -> NoReturn:
    """Turn an error answer into a CommandFailed that lists every validation problem."""
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"detail": response.text}
    lines = [f"error {response.status_code}: {body.get('detail', response.reason_phrase)}"]
    for problem in body.get("errors") or []:
        lines.append(f"  {problem.get('path') or '<root>'}: {problem.get('message')}")
    raise CommandFailed("\n".join(lines), 1)


def push(args: argparse.Namespace) -> int:
    import yaml

    path = Path(args.file)
    text = read_file(path)
    try:
        document = json.loads(text) if content_type_of(path) == "application/json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise CommandFailed(
            f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}", 1
        ) from None
    name = document.get("name") if isinstance(document, dict) else None
    name = name if isinstance(name, str) and name else path.stem
    with client(args.server) as http:
        response = request(
            http,
            "PUT",
            f"/graphs/{name}",
            content=text.encode(),
            headers={"Content-Type": content_type_of(path)},
        )
    if response.status_code not in (200, 201):
        fail(response)
    stored = response.json()
    what = "created" if response.status_code == 201 else "updated"
    print(f"{stored['name']} version {stored['version']} ({what}, {stored['nodes']} nodes)")
    return 0


def parse_input(raw: str) -> Any:
    if raw.startswith("@"):
        raw = read_file(Path(raw[1:]))
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise CommandFailed(f"--input must be JSON (or @file.json): {exc}", 2) from None


def run(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"input": parse_input(args.input)}
    if args.version is not None:
        body["version"] = args.version
    if args.idempotency_key:
        body["idempotency_key"] = args.idempotency_key
    with client(args.server) as http:
        url = f"/graphs/{args.graph}/runs"
        if args.follow:
            response = request(http, "POST", url, json=body)
            if response.status_code not in (200, 202):
                fail(response)
            started = response.json()
            print(f"run {started['id']} of {started['graph']} v{started['version']}", flush=True)
            return follow(http, started, sys.stdout)
        if args.wait:
            # Waiting in chunks: the same idempotency key finds the same run and waits again.
            body.setdefault("idempotency_key", f"cli-{uuid.uuid4()}")
            while True:
                response = request(
                    http, "POST", url, params={"wait": "true", "timeout": WAIT_CHUNK_SECONDS}, json=body
                )
                if response.status_code == 200:
                    break
                if response.status_code != 202:
                    fail(response)
            return report(response.json(), sys.stdout)
        response = request(http, "POST", url, json=body)
        if response.status_code not in (200, 202):
            fail(response)
        print(response.json()["id"])
        return 0


def report(run: dict[str, Any], out: TextIO) -> int:
    """Print how the run ended and its output; the exit code (0 only when it succeeded)."""
    duration = run.get("duration_ms")
    took = f" in {duration / 1000:.2f}s" if isinstance(duration, int | float) else ""
    out.write(f"run {run['id']} {run['status']}{took}\n")
    if run.get("error"):
        out.write(f"error: {run['error']}\n")
    if run.get("output") is not None:
        output = run["output"]
        out.write((output if isinstance(output, str) else json.dumps(output, indent=2)) + "\n")
    out.flush()
    return 0 if run["status"] == "succeeded" else 1


# --- following a run -------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Frame:
    id: str | None = None
    event: str = "message"
    data: str = ""


def sse_frames(lines: Iterable[str]) -> Iterator[Frame]:
    """Server-Sent Events frames from the lines of a stream (comments and keep-alives skipped)."""
    frame, data = Frame(), list[str]()
    for line in lines:
        line = line.rstrip("\r")
        if not line:
            if data:
                frame.data = "\n".join(data)
                yield frame
            frame, data = Frame(), []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            frame.event = value
        elif field == "id":
            frame.id = value


def short(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def node_label(event: dict[str, Any]) -> str:
    label = str(event.get("node", ""))
    if event.get("index") is not None:
        label += f"[{event['index']}]"
    if event.get("iteration"):
        label += f"#{event['iteration']}"
    return label


def describe(event: dict[str, Any]) -> str | None:
    """The text after the event type on an event's line (None: do not print the event)."""
    kind = event.get("type")
    if kind == "node.delta":
        return None
    if kind == "workflow.started":
        return f"{event.get('graph')} v{event.get('version')}"
    if kind == "node.started":
        attempt = event.get("attempt", 1)
        return node_label(event) + (f" (attempt {attempt})" if attempt and attempt > 1 else "")
    if kind == "node.retrying":
        error, delay = short(event.get("error")), event.get("delay")
        return f"{node_label(event)} attempt {event.get('attempt')} failed: {error}; retry in {delay}s"
    if kind == "node.completed":
        return f"{node_label(event)} {event.get('duration_ms')} ms  {short(event.get('output'))}"
    if kind == "node.failed":
        return f"{node_label(event)} {short(event.get('error'), 120)}"
    if kind == "workflow.finished":
        return f"{event.get('status')} in {event.get('duration_ms')} ms" + (
            f": {event['error']}" if event.get("error") else ""
        )
    return node_label(event)


class Progress:
    """Prints each event as a line and, on a terminal, a live progress line under them."""

    def __init__(self, out: TextIO, total: int) -> None:
        self.out = out
        self.total = total
        self.live = out.isatty()
        self.began = time.monotonic()
        self.first_at: float | None = None
        self.done: set[str] = set()
        self.current: dict[str, None] = {}

    def event(self, event: dict[str, Any]) -> None:
        kind = str(event.get("type"))
        node = event.get("node")
        whole = event.get("index") is None
        if isinstance(node, str) and whole:
            if kind in ("node.started", "node.retrying"):
                self.current[node] = None
                self.done.discard(node)
            elif kind in ("node.completed", "node.failed", "node.skipped"):
                self.current.pop(node, None)
                self.done.add(node)
        text = describe(event)
        if text is None and not self.live:
            return
        self._clear()
        if text is not None:
            self.out.write(f"[{self._elapsed(event):6.2f}s] {kind:<17} {text}\n")
        self._draw()

    def _elapsed(self, event: dict[str, Any]) -> float:
        try:
            from datetime import datetime

            at = datetime.fromisoformat(str(event["at"])).timestamp()
        except (KeyError, ValueError):
            return time.monotonic() - self.began
        if self.first_at is None:
            self.first_at = at
        return at - self.first_at

    def _clear(self) -> None:
        if self.live:
            self.out.write("\r\x1b[K")

    def _draw(self) -> None:
        if self.live:
            self.out.write(self.line())
        self.out.flush()

    def line(self) -> str:
        current = ", ".join(self.current) or "-"
        total = f"/{self.total}" if self.total else ""
        return (
            f"{len(self.done)}{total} nodes done · running: {current} · {time.monotonic() - self.began:.1f}s"
        )

    def finish(self) -> None:
        self._clear()
        self.out.write(self.line() + "\n")
        self.out.flush()


def graph_size(http: httpx.Client, name: str, version: int) -> int:
    response = request(http, "GET", f"/graphs/{name}", params={"version": version})
    if response.status_code != 200:
        return 0
    nodes = response.json().get("nodes")
    return nodes if isinstance(nodes, int) else 0


def follow(http: httpx.Client, started: dict[str, Any], out: TextIO) -> int:
    """Print the run's events as they come, then how it ended; falls back to polling."""
    run_id = str(started["id"])
    progress = Progress(out, graph_size(http, started["graph"], started["version"]))
    after = 0
    finished = False
    for _ in range(20):  # reconnects
        try:
            with http.stream(
                "GET",
                f"/runs/{run_id}/events",
                params={"after": after},
                headers={"Accept": "text/event-stream", "Last-Event-ID": str(after)},
            ) as response:
                if response.status_code in (404, 405, 406) or not response.headers.get(
                    "content-type", ""
                ).startswith("text/event-stream"):
                    return poll(http, run_id, progress)
                for frame in sse_frames(response.iter_lines()):
                    event = json.loads(frame.data)
                    if frame.id is not None and frame.id.isdigit():
                        after = int(frame.id)
                    progress.event(event)
                    if frame.event == "workflow.finished":
                        finished = True
                        break
        except httpx.ConnectError:
            raise CommandFailed(
                f"cannot reach Braid at {http.base_url}: is `braid serve` running?", 2
            ) from None
        except httpx.TransportError:
            continue  # the stream broke: resume after the last event seen
        if finished:
            break
    progress.finish()
    response = request(http, "GET", f"/runs/{run_id}")
    if response.status_code != 200:
        fail(response)
    return report(response.json(), out)


def poll(http: httpx.Client, run_id: str, progress: Progress) -> int:
    """Follow a run by polling ``GET /runs/{id}`` (a server without the events endpoint)."""
    seen: dict[tuple[str, int, int | None], str] = {}
    while True:
        response = request(http, "GET", f"/runs/{run_id}")
        if response.status_code != 200:
            fail(response)
        run = response.json()
        for node in run.get("nodes", []):
            key = (node["node"], node.get("iteration") or 0, node.get("index"))
            status = node["status"]
            if seen.get(key) == status:
                continue
            if key not in seen and status != "running":
                progress.event({**node, "type": "node.started", "at": node.get("started_at")})
            seen[key] = status
            kind = {"succeeded": "node.completed", "failed": "node.failed", "skipped": "node.skipped"}.get(
                status, "node.started"
            )
            at = node.get("finished_at") or node.get("started_at")
            progress.event({**node, "type": kind, "at": at})
        if run["status"] in ("succeeded", "failed", "cancelled"):
            progress.finish()
            return report(run, progress.out)
        time.sleep(POLL_SECONDS)


# --- main ------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(prog="braid", description="Braid: graphs of AI agents, run by API.")
    commands = main_parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("serve", help="run the API server (and, in embedded mode, the workers)")
    p.add_argument("--host", help="address to listen on (default: BRAID_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default: BRAID_PORT or 8000)")
    p.add_argument(
        "--workers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="execute runs in this process (default: yes in embedded mode, no in distributed mode)",
    )
    p.set_defaults(handler=serve)

    p = commands.add_parser("worker", help="execute runs taken from Redis (distributed mode)")
    p.set_defaults(handler=worker)

    server_help = "the Braid server (default: http://$BRAID_HOST:$BRAID_PORT)"
    p = commands.add_parser("push", help="store a graph file on the server (a new version if it exists)")
    p.add_argument("file", help="the graph, YAML or JSON")
    p.add_argument("--server", default=default_server(), help=server_help)
    p.set_defaults(handler=push)

    p = commands.add_parser("validate", help="check a graph file locally, listing every problem")
    p.add_argument("file", help="the graph, YAML or JSON")
    p.set_defaults(handler=validate)

    p = commands.add_parser("run", help="start a run of a stored graph")
    p.add_argument("graph", help="the graph's name")
    p.add_argument("--input", default="{}", help="the run's input as JSON, or @file.json (default: {})")
    p.add_argument("--version", type=int, help="the graph version (default: the latest)")
    p.add_argument("--idempotency-key", help="starting again with the same key returns the same run")
    p.add_argument("--server", default=default_server(), help=server_help)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--follow", action="store_true", help="print the events as they come, then the output")
    how.add_argument("--wait", action="store_true", help="wait for the run to end, then print its output")
    p.set_defaults(handler=run)
    return main_parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        code = args.handler(args)
    except CommandFailed as exc:
        print(str(exc), file=sys.stderr)
        code = exc.code
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
