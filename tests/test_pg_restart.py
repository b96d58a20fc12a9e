"""PostgreSQL going away and coming back mid-load, in distributed mode: the API answers 503 while
it is gone, the API and the workers reconnect when it is back, and no accepted run is lost
(DESIGN.md, "Deployment modes" and "Durability").

The shared PostgreSQL must never restart under other tests, so this module starts a private
cluster of its own (``initdb``/``pg_ctl`` as the ``postgres`` OS user when the tests run as
root) and stops it mid-load. Redis is the shared one, under a key prefix of this module's own.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from server.keys import Keys
from server.queue.redis import WORKER_GROUP
from server.runner import MAX_DELIVERIES
from tests.server_process import free_port
from tests.services import require_redis
from tests.test_distributed import (
    RECLAIM_IDLE_MS,
    Cluster,
    Process,
    assert_clean_history,
    asyncpg_dsn,
    put_graph,
    running_cluster,
    sql,
    start_runs,
    wait_for,
    wait_until_ended,
)

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

RUNS = 20
UNAVAILABLE = {"status_code": 503, "detail": "the database is unavailable; try again shortly"}


def _missing(message: str) -> None:
    """Skip on a laptop without PostgreSQL's binaries; fail in CI (as tests/services.py does)."""
    if os.environ.get("BRAID_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message} and BRAID_REQUIRE_SERVICES=1: install it (see .ci/run)")
    pytest.skip(message)


def _postgres_bin() -> Path:
    """The newest installed PostgreSQL's bin folder (the one with ``initdb`` and ``pg_ctl``)."""
    found = [
        Path(folder)
        for folder in glob.glob("/usr/lib/postgresql/*/bin")
        if os.access(Path(folder) / "initdb", os.X_OK) and os.access(Path(folder) / "pg_ctl", os.X_OK)
    ]
    if not found:
        initdb = shutil.which("initdb")
        if initdb is None or shutil.which("pg_ctl") is None:
            _missing("PostgreSQL's initdb and pg_ctl are not installed")
            raise AssertionError("unreachable")
        return Path(initdb).parent

    def version(folder: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in folder.parent.name.split(".") if part.isdigit())

    return max(found, key=version)


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of this module's own, which the test may stop and start again."""

    bin: Path
    base: Path
    port: int
    as_postgres: list[str]

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/braid"

    def _run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        # Output to a file, not a pipe: the postmaster that pg_ctl forks must not hold our pipe.
        with (self.base / "commands.log").open("ab") as log_file:
            done = subprocess.run(
                [*self.as_postgres, str(self.bin / command[0]), *command[1:]],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                timeout=60,
                check=False,
            )
        if check and done.returncode != 0:
            raise AssertionError(f"{command[0]} failed ({done.returncode}):\n{self.log()[-3000:]}")
        return done

    def log(self) -> str:
        parts = [self.base / "commands.log", self.base / "server.log"]
        return "\n".join(p.read_text(errors="replace") for p in parts if p.exists())

    def initdb(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.base / "server.log"), "-o", options, "-w", "start"
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL cluster with an empty ``braid`` database, removed afterwards."""
    folder = _postgres_bin()
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        runuser = shutil.which("runuser")
        if runuser is None:
            _missing("runuser is not installed (needed to run PostgreSQL as the postgres user)")
        as_postgres = [str(runuser), "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="braid-pg-"))  # short: it holds the socket
    try:
        if os.geteuid() == 0:
            shutil.chown(base, "postgres", "postgres")
        cluster = PrivatePostgres(folder, base, free_port(), as_postgres)
        cluster.initdb()
        cluster.start()
        try:
            sql(asyncpg_dsn(cluster.url).rsplit("/", 1)[0] + "/postgres", "CREATE DATABASE braid")
            yield cluster
        finally:
            if cluster.running():
                cluster.stop("immediate")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def services(postgres: PrivatePostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One ``braid serve`` and two ``braid worker`` processes on the private PostgreSQL."""
    folder = tmp_path_factory.mktemp("pg-restart")
    prefix = f"braid-pgr-{uuid.uuid4().hex[:10]}"
    with running_cluster(folder, postgres.url, require_redis(), prefix, apis=1, workers=2) as cluster:
        yield cluster


def health(api: Process, status_code: int) -> httpx.Response | None:
    """``GET /health`` if it answers ``status_code``, else None."""
    try:
        response = httpx.get(f"{api.url}/health", timeout=10)
    except httpx.TransportError:
        return None
    return response if response.status_code == status_code else None


def most_deliveries(cluster: Cluster) -> int:
    """The most times a run's message was delivered to a worker, among those being executed."""
    with redis.Redis.from_url(cluster.redis_url) as client:
        pending = client.xpending_range(Keys(cluster.prefix).runs, WORKER_GROUP, "-", "+", 1000)
    return max((int(entry["times_delivered"]) for entry in pending), default=0)


def running_count(api: Process, run_ids: list[str]) -> int:
    with httpx.Client(base_url=api.url, timeout=10) as http:
        return sum(http.get(f"/runs/{run_id}").json()["status"] == "running" for run_id in run_ids)


def test_runs_survive_a_postgres_restart_mid_load(postgres: PrivatePostgres, services: Cluster) -> None:
    api = services.apis[0]
    put_graph(
        api,
        {
            "name": "steady",
            "nodes": {
                "first": {"agent": "template", "template": "hi"},
                "nap": {"agent": "wait", "seconds": 1},
                "last": {"agent": "template", "template": "bye"},
            },
            "edges": [{"from": "first", "to": "nap"}, {"from": "nap", "to": "last"}],
        },
    )
    run_ids = start_runs(api, "steady", RUNS)
    wait_for(lambda: running_count(api, run_ids) >= 4, 30, "several runs to be running")

    stopped = time.monotonic()
    postgres.stop("fast")
    down = wait_for(lambda: health(api, 503), 20, "/health to report 503")
    assert down.json()["database"] == "down", down.json()
    assert down.json()["queue"] == "ok", down.json()

    # While the database is gone the API says so, with a 503 a client can retry on.
    accepted = httpx.post(f"{api.url}/graphs/steady/runs", json={"input": {}}, timeout=20)
    assert accepted.status_code == 503, accepted.text
    assert accepted.json() == UNAVAILABLE
    read = httpx.get(f"{api.url}/runs/{run_ids[0]}", timeout=20)
    assert read.status_code == 503, read.text
    assert read.json() == UNAVAILABLE

    # The workers hold their runs through an outage longer than it takes to deliver a run more
    # than MAX_DELIVERIES times (had they handed their runs back, those would now have failed).
    outage = (MAX_DELIVERIES + 1) * RECLAIM_IDLE_MS / 1000
    wait_for(
        lambda: (
            all("holding the run" in worker.log() for worker in services.workers)
            and time.monotonic() - stopped > outage
        ),
        outage + 30,
        "both workers to hold their runs through the outage",
    )
    assert most_deliveries(services) == 1, "runs were delivered again while their workers held them"
    assert all(process.alive for process in [*services.apis, *services.workers])

    postgres.start()
    wait_for(lambda: health(api, 200), 30, "/health to be 200 again")
    runs = wait_until_ended(api, run_ids, 90)
    assert {run["status"] for run in runs.values()} == {"succeeded"}, [
        (run["id"], run["status"], run["error"]) for run in runs.values() if run["status"] != "succeeded"
    ]
    for run_id in run_ids:
        assert_clean_history(api, run_id, "succeeded")
    assert all(process.alive for process in [*services.apis, *services.workers]), [
        process.log()[-2000:] for process in [*services.apis, *services.workers] if not process.alive
    ]
    assert all("the database is back; resuming the run" in worker.log() for worker in services.workers)
    # The API takes new runs again, and they run.
    (late,) = start_runs(api, "steady", 1)
    assert wait_until_ended(api, [late], 30)[late]["status"] == "succeeded"
