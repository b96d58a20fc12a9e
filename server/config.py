"""Settings: one typed object built from the environment. A wrong value fails at start with a
message naming the variable."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import SettingsError

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./braid.db"


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str | None = None
    redis_prefix: str = "braid"
    """The prefix of every Redis key (BRAID_REDIS_PREFIX): deployments sharing a Redis differ in it."""
    reclaim_idle_ms: int = 30_000
    """A run whose worker sent no heartbeat for this long is taken over by another worker
    (BRAID_RECLAIM_IDLE_MS); the sweep for lost runs is paced by it too."""
    host: str = "127.0.0.1"
    port: int = 8000
    prompts_dir: Path = Path("prompts")
    examples_dir: Path | None = None
    worker_concurrency: int = 32
    agent_modules: tuple[str, ...] = ()
    template_env: tuple[str, ...] = ()
    openai_api_key: str | None = None
    openai_base_url: str | None = None
    default_model: str = "gpt-4o-mini"
    providers: Mapping[str, tuple[str, str]] = field(default_factory=dict[str, tuple[str, str]])
    max_body_bytes: int = 1_048_576
    mock_delay: float = 0.02

    @property
    def distributed(self) -> bool:
        """Distributed mode: runs go through Redis to `braid worker` processes."""
        return self.redis_url is not None

    @property
    def use_mock_model(self) -> bool:
        """No LLM provider is configured: serve the offline mock model."""
        return not self.openai_api_key and not self.openai_base_url

    def template_variables(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment variables templates may read as ``env.NAME`` (BRAID_TEMPLATE_ENV)."""
        environ = os.environ if environ is None else environ
        return {name: environ[name] for name in self.template_env if name in environ}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name)
            return value.strip() if value and value.strip() else None

        def integer(name: str, default: int, minimum: int = 1, maximum: int = 1_000_000) -> int:
            raw = get(name)
            if raw is None:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise SettingsError(f"{name} must be a whole number, not {raw!r}") from None
            if not minimum <= value <= maximum:
                raise SettingsError(f"{name} must be between {minimum} and {maximum}, not {value}")
            return value

        def number(name: str, default: float) -> float:
            raw = get(name)
            if raw is None:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise SettingsError(f"{name} must be a number, not {raw!r}") from None
            if value < 0:
                raise SettingsError(f"{name} must not be negative, not {value}")
            return value

        def names(name: str) -> tuple[str, ...]:
            raw = get(name) or ""
            return tuple(part.strip() for part in raw.replace(";", ",").split(",") if part.strip())

        database_url = get("BRAID_DATABASE_URL") or DEFAULT_DATABASE_URL
        if not database_url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise SettingsError(
                "BRAID_DATABASE_URL must start with sqlite+aiosqlite:// or postgresql+asyncpg://, "
                f"not {database_url.split('://')[0]!r}://..."
            )
        redis_url = get("BRAID_REDIS_URL")
        if redis_url is not None and not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError("BRAID_REDIS_URL must start with redis://, rediss:// or unix://")
        if redis_url is not None and database_url.startswith("sqlite"):
            raise SettingsError(
                "BRAID_REDIS_URL is set but BRAID_DATABASE_URL is SQLite: distributed mode needs a shared "
                "database; set BRAID_DATABASE_URL=postgresql+asyncpg://..."
            )

        redis_prefix = get("BRAID_REDIS_PREFIX") or "braid"
        if not all(c.isalnum() or c in "-_.:" for c in redis_prefix):
            raise SettingsError(
                f"BRAID_REDIS_PREFIX may hold only letters, digits and - _ . :, not {redis_prefix!r}"
            )

        providers: dict[str, tuple[str, str]] = {}
        raw_providers = get("BRAID_PROVIDERS")
        if raw_providers:
            try:
                parsed = json.loads(raw_providers)
                if not isinstance(parsed, dict):
                    raise ValueError("not an object")
                for pname, spec in parsed.items():
                    if not isinstance(spec, dict) or "base_url" not in spec:
                        raise ValueError(f"provider {pname!r} needs base_url")
                    key_var = spec.get("api_key_env")
                    api_key = (env.get(key_var, "") if key_var else spec.get("api_key", "")) or "none"
                    providers[str(pname)] = (str(spec["base_url"]), str(api_key))
            except ValueError as exc:
                raise SettingsError(
                    'BRAID_PROVIDERS must be JSON like {"local": {"base_url": "http://...", '
                    f'"api_key_env": "LOCAL_KEY"}}: {exc}'
                ) from None

        examples = get("BRAID_EXAMPLES_DIR")
        return cls(
            database_url=database_url,
            redis_url=redis_url,
            redis_prefix=redis_prefix,
            reclaim_idle_ms=integer("BRAID_RECLAIM_IDLE_MS", 30_000, 100, 86_400_000),
            host=get("BRAID_HOST") or "127.0.0.1",
            port=integer("BRAID_PORT", 8000, 0, 65535),
            prompts_dir=Path(get("BRAID_PROMPTS_DIR") or "prompts"),
            examples_dir=Path(examples) if examples else (None if redis_url else Path("examples")),
            worker_concurrency=integer("BRAID_WORKER_CONCURRENCY", 32, 1, 10_000),
            agent_modules=names("BRAID_AGENT_MODULES"),
            template_env=names("BRAID_TEMPLATE_ENV"),
            openai_api_key=get("OPENAI_API_KEY"),
            openai_base_url=get("OPENAI_BASE_URL"),
            default_model=get("BRAID_DEFAULT_MODEL") or "gpt-4o-mini",
            providers=providers,
            max_body_bytes=integer("BRAID_MAX_BODY_BYTES", 1_048_576, 1024, 1 << 30),
            mock_delay=number("BRAID_MOCK_DELAY", 0.02),
        )


FOLDER_SETTINGS = ("BRAID_EXAMPLES_DIR", "BRAID_PROMPTS_DIR")


def check_folders(environ: Mapping[str, str] | None = None) -> None:
    """The folders set explicitly (BRAID_EXAMPLES_DIR, BRAID_PROMPTS_DIR) must exist on this machine.

    Unset, their defaults (``./examples``, ``./prompts``) may be missing: nothing is loaded from them.
    Kept out of ``Settings.from_env``, which only parses: a deployment's settings (compose, the
    Dockerfile) can be parsed on a machine that lacks its folders."""
    env = os.environ if environ is None else environ
    for name in FOLDER_SETTINGS:
        raw = (env.get(name) or "").strip()
        if not raw:
            continue
        path = Path(raw)
        if not path.is_dir():
            what = "is not a folder" if path.exists() else "does not exist"
            where = "" if path.is_absolute() else f" in {Path.cwd()}"
            raise SettingsError(
                f"{name} is {raw!r}, which {what}{where}; set it to a folder that exists, or unset it"
            )
