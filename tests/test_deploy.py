"""compose.yaml and the Dockerfile agree with the code they run.

No Docker engine runs in CI, so the images are not built here; what can drift silently is
checked instead: the services compose promises, the settings it passes (each one Braid reads,
each value Braid accepts, distributed mode), the commands it runs (real ``braid`` commands with
real flags), and the files the Dockerfile copies.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from server import cli
from server.config import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()
CONFIG_SOURCE = (ROOT / "server" / "config.py").read_text()
INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?::-(?P<default>[^}]*))?\}")


def interpolate(value: Any) -> str:
    """A compose value as compose would pass it with no variable set (``${NAME:-default}``)."""
    return INTERPOLATION.sub(lambda m: m.group("default") or "", str(value))


def dockerfile_env() -> dict[str, str]:
    """The ``ENV`` settings of the Dockerfile's final stage."""
    final = DOCKERFILE.rsplit("\nFROM ", 1)[1]
    env: dict[str, str] = {}
    for match in re.finditer(r"^ENV ((?:.*\\\n)*.*)$", final, re.MULTILINE):
        for pair in shlex.split(match.group(1).replace("\\\n", " ")):
            name, _, value = pair.partition("=")
            env[name] = value
    return env


def service_env(name: str) -> dict[str, str]:
    """The environment of a compose service's container: the image's, then compose's."""
    environment = COMPOSE["services"][name].get("environment", {})
    return {**dockerfile_env(), **{key: interpolate(value) for key, value in environment.items()}}


def test_compose_runs_postgres_redis_an_api_and_scalable_workers() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"postgres", "redis", "api", "worker"}
    for name in ("api", "worker"):
        assert services[name]["build"] == "."
        assert set(services[name]["depends_on"]) == {"postgres", "redis"}
    # `--scale worker=N` needs a worker without a published port or a fixed container name.
    assert "ports" not in services["worker"]
    assert "container_name" not in services["worker"]
    assert services["api"]["ports"] == ["${BRAID_PORT:-8000}:8000"]


@pytest.mark.parametrize("name", ["api", "worker"])
def test_compose_settings_are_braids_and_valid_for_distributed_mode(name: str) -> None:
    env = service_env(name)
    unknown = [key for key in env if key.startswith("BRAID_") and f'"{key}"' not in CONFIG_SOURCE]
    assert unknown == [], f"{name} sets settings Braid does not read: {unknown}"
    settings = Settings.from_env(env)
    assert settings.distributed
    postgres = COMPOSE["services"]["postgres"]["environment"]
    assert settings.database_url.endswith(f"@postgres:5432/{postgres['POSTGRES_DB']}")
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.openai_api_key is None  # unset: the offline mock model


@pytest.mark.parametrize(("name", "handler"), [("api", cli.serve), ("worker", cli.worker)])
def test_compose_commands_are_braid_commands(name: str, handler: Any) -> None:
    command = COMPOSE["services"][name]["command"]
    assert command[0] == "braid"
    args = cli.parser().parse_args(command[1:])
    assert args.handler is handler
    if name == "api":
        assert (args.host, args.port) == ("0.0.0.0", 8000)


def test_dockerfile_copies_files_that_exist_and_runs_braid_serve() -> None:
    sources = [
        part
        for line in DOCKERFILE.splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for part in line.split()[1:-1]
    ]
    assert "uv.lock" in sources
    assert "server" in sources
    missing = [source for source in sources if not (ROOT / source).exists()]
    assert missing == []
    env = dockerfile_env()
    assert Settings.from_env(env).database_url.startswith("sqlite+aiosqlite:////app/data/")
    cmd = re.search(r"^CMD (\[.*\])$", DOCKERFILE, re.MULTILINE)
    assert cmd is not None
    command = yaml.safe_load(cmd.group(1))
    assert command[0] == "braid"
    assert cli.parser().parse_args(command[1:]).handler is cli.serve


def test_readme_documents_the_compose_quickstart() -> None:
    assert "docker compose up --scale worker=4" in (ROOT / "README.md").read_text()
