"""Shared fixtures: the anyio backend, settings for a throwaway embedded Braid, and an app client."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from server.config import Settings
from tests.server_process import CLEARED, free_port, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
PROMPTS_DIR = ROOT / "prompts"
EXAMPLES_DIR = ROOT / "examples"

SettingsFactory = Callable[..., Settings]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def make_settings(tmp_path: Path) -> SettingsFactory:
    """Settings of an embedded Braid on a fresh SQLite file: no examples, the mock model answering
    at once, the repository's prompts; keyword arguments override any field."""

    def make(**overrides: Any) -> Settings:
        base = Settings(
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'braid.db'}",
            prompts_dir=PROMPTS_DIR,
            examples_dir=None,
            mock_delay=0,
        )
        return dataclasses.replace(base, **overrides)

    return make


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    return make_settings()


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    """The API app (embedded, with its in-process workers) behind Litestar's test client."""
    from server.api.app import create_app

    async with AsyncTestClient(app=create_app(settings)) as test_client:
        yield test_client


# --- `braid serve` as a subprocess, as a user starts it ------------------------------------------


@dataclasses.dataclass
class Served:
    """A ``braid serve`` process: its URL, the process, and its combined stdout/stderr log."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, within: float = 10.0) -> int:
        """SIGTERM, as a supervisor stops it; the exit code (killed and failed after ``within`` s)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(within)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"braid serve did not stop within {within} s:\n{self.log()[-3000:]}"
            ) from None


def serve_env(folder: Path, port: int, **extra: str) -> dict[str, str]:
    """The environment of a user running ``braid serve`` in embedded mode with a fresh database."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(
        BRAID_HOST="127.0.0.1",
        BRAID_PORT=str(port),
        BRAID_DATABASE_URL=f"sqlite+aiosqlite:///{folder / 'braid.db'}",
        BRAID_EXAMPLES_DIR=str(EXAMPLES_DIR),
        BRAID_PROMPTS_DIR=str(PROMPTS_DIR),
        BRAID_MOCK_DELAY="0",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def start_serve(folder: Path, env: dict[str, str] | None = None, *, within: float = 60.0) -> Served:
    """Start ``python -m server.cli serve`` on a free port and wait until ``/health`` answers 200."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = folder / f"serve-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve"],
            cwd=folder,
            env=serve_env(folder, port, **(env or {})),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    served = Served(f"http://127.0.0.1:{port}", process, log_path)
    wait_healthy(served.url, process, served.log, served.stop, within)
    return served


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One ``braid serve`` process shared by the tests that talk to a real server."""
    server = start_serve(tmp_path_factory.mktemp("served"))
    try:
        yield server
    finally:
        server.stop()
