"""Run Braid as a real server process for tests that need real HTTP (SSE streams, restarts).

    with running_server(tmp_path) as server:
        httpx.get(f"{server.url}/health")

The server runs ``create_app()`` under uvicorn on a free port, in embedded mode, with a SQLite
file under the given folder, no examples, the mock model answering at once, and BRAID_DEBUG=1.
``server.restart()`` stops it and starts a new process on the same database and port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
CLEARED = ("BRAID_REDIS_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL", "BRAID_PROVIDERS", "BRAID_AGENT_MODULES")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    url: str
    port: int
    folder: Path
    env: Mapping[str, str]
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout: float = 15.0) -> None:
        """Stop gracefully (SIGTERM, as a supervisor would), killing it after ``timeout``."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"the server did not stop within {timeout} s:\n{self.log()[-4000:]}"
            ) from None

    def restart(self) -> None:
        """Stop, then start a new process on the same database, port and settings."""
        self.stop()
        fresh = start_server(self.folder, self.env, port=self.port)
        self.process, self.log_path = fresh.process, fresh.log_path


def start_server(
    folder: Path, env: Mapping[str, str] | None = None, *, port: int | None = None, timeout: float = 60.0
) -> ServerProcess:
    """Start a server whose database, prompts and log live in ``folder``; wait for ``/health``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "examples").mkdir(exist_ok=True)
    (folder / "prompts").mkdir(exist_ok=True)
    port = free_port() if port is None else port
    environ = {key: value for key, value in os.environ.items() if key not in CLEARED}
    environ.update(
        {
            "BRAID_HOST": "127.0.0.1",
            "BRAID_PORT": str(port),
            "BRAID_DATABASE_URL": f"sqlite+aiosqlite:///{folder / 'braid.db'}",
            "BRAID_EXAMPLES_DIR": str(folder / "examples"),
            "BRAID_PROMPTS_DIR": str(folder / "prompts"),
            "BRAID_MOCK_DELAY": "0",
            "BRAID_DEBUG": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    environ.update(env or {})
    log_path = folder / f"server-{port}-{time.monotonic_ns()}.log"
    command = [
        *(sys.executable, "-m", "uvicorn", "--factory", "server.api.app:create_app"),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--log-level", "warning", "--timeout-graceful-shutdown", "5"),
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, cwd=ROOT, env=environ, stdout=log_file, stderr=subprocess.STDOUT)
    server = ServerProcess(f"http://127.0.0.1:{port}", port, folder, dict(env or {}), process, log_path)
    wait_healthy(server.url, process, server.log, server.stop, timeout)
    return server


def wait_healthy(
    url: str,
    process: subprocess.Popen[bytes],
    log: Callable[[], str],
    stop: Callable[[], object],
    within: float,
) -> None:
    """Wait until ``{url}/health`` answers 200; fail with the log's tail if the process exits
    first, or (after ``stop``) if ``within`` seconds pass."""
    deadline = time.monotonic() + within
    while True:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{log()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop()
            raise AssertionError(f"no answer from /health within {within} s:\n{log()[-4000:]}")
        time.sleep(0.05)  # the poll interval; the deadline above bounds the wait


@contextmanager
def running_server(folder: Path, env: Mapping[str, str] | None = None) -> Generator[ServerProcess]:
    server = start_server(folder, env)
    try:
        yield server
    finally:
        server.stop()
