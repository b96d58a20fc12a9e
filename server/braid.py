"""One Braid process's wiring: the store, the queue, the event bus, the agent registry, the LLM
clients (and the offline mock model), and — in embedded mode or when asked — the runner."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx

from agents.providers import LLMClients
from agents.registry import Registry, default_registry
from server.bus.base import EventBus
from server.config import Settings
from server.engine.context import Resources
from server.errors import ValidationFailed
from server.graph.fields import ValidationContext
from server.graph.parse import build_graph, load_document
from server.queue.base import RunQueue
from server.runner import HEARTBEAT_SECONDS, GraphCache, Runner
from server.runs import Runs
from server.status import RunStatus
from server.store.base import Store

log = logging.getLogger("braid")

EXAMPLE_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(slots=True)
class Braid:
    settings: Settings
    store: Store
    queue: RunQueue
    bus: EventBus
    registry: Registry
    validation: ValidationContext
    graphs: GraphCache
    runs: Runs
    runner: Runner | None
    llm_base_url: str

    @property
    def mode(self) -> str:
        return "distributed" if self.settings.distributed else "embedded"


def _queue_and_bus(settings: Settings) -> tuple[RunQueue, EventBus]:
    if settings.redis_url:
        from server.bus.redis import RedisBus
        from server.queue.redis import RedisQueue

        prefix = settings.redis_prefix
        return (
            RedisQueue(settings.redis_url, prefix=prefix, idle_ms=settings.reclaim_idle_ms),
            RedisBus(settings.redis_url, prefix=prefix),
        )
    from server.bus.memory import MemoryBus
    from server.queue.memory import MemoryQueue

    return MemoryQueue(), MemoryBus()


def _read_examples(folder: Path) -> list[tuple[Path, str]]:
    paths = sorted(p for p in folder.iterdir() if p.suffix in EXAMPLE_SUFFIXES)
    return [(p, p.read_text(encoding="utf-8")) for p in paths]


async def load_examples(braid: Braid, folder: Path) -> list[str]:
    """Store each example graph of ``folder`` whose spec differs from its latest stored version."""
    from server.errors import NotFound

    loaded: list[str] = []
    files = await anyio.to_thread.run_sync(_read_examples, folder)
    for path, text in files:
        try:
            spec = load_document(text, "application/yaml")
            graph = build_graph(spec, braid.registry, braid.validation)
        except ValidationFailed as exc:
            log.error("example %s is invalid: %s", path, exc)
            continue
        try:
            latest = await braid.store.get_graph(graph.name)
            if latest.spec == spec:
                continue
        except NotFound:
            pass
        await braid.store.put_graph(graph.name, spec, graph.description, len(graph.nodes))
        loaded.append(graph.name)
    return loaded


@asynccontextmanager
async def open_braid(settings: Settings, *, workers: bool | None = None) -> AsyncGenerator[Braid]:
    """Start everything one process needs; ``workers`` defaults to True in embedded mode."""
    from server.mockllm import MockModelServer
    from server.store.sql import SqlStore

    run_workers = (not settings.distributed) if workers is None else workers
    async with AsyncExitStack() as stack:
        store = SqlStore(settings.database_url)
        await store.start()
        stack.push_async_callback(store.close)
        queue, bus = _queue_and_bus(settings)
        stack.push_async_callback(queue.close)
        stack.push_async_callback(bus.close)

        if settings.use_mock_model:
            mock = await stack.enter_async_context(MockModelServer(delay=settings.mock_delay))
            base_url, api_key = mock.base_url, "braid-mock"
        else:
            base_url = settings.openai_base_url or "https://api.openai.com/v1"
            api_key = settings.openai_api_key or "none"
        llm = LLMClients(base_url, api_key, settings.default_model, dict(settings.providers))
        stack.push_async_callback(llm.aclose)
        http = await stack.enter_async_context(httpx.AsyncClient(follow_redirects=True))

        registry = default_registry(settings.agent_modules)
        validation = ValidationContext(prompts_dir=settings.prompts_dir)
        graphs = GraphCache(store, registry, validation)
        runner = None
        if run_workers:
            runner = Runner(
                store=store,
                queue=queue,
                bus=bus,
                registry=registry,
                resources=Resources(llm, http),
                validation=validation,
                env=settings.template_variables(),
                concurrency=settings.worker_concurrency,
                # Beat well within the idle limit, so a live run is never taken over.
                heartbeat_seconds=min(HEARTBEAT_SECONDS, settings.reclaim_idle_ms / 3000),
            )
        braid = Braid(
            settings=settings,
            store=store,
            queue=queue,
            bus=bus,
            registry=registry,
            validation=validation,
            graphs=graphs,
            runs=Runs(store, queue, bus, graphs),
            runner=runner,
            llm_base_url=base_url,
        )
        if settings.examples_dir is not None and settings.examples_dir.is_dir():
            await load_examples(braid, settings.examples_dir)

        async with anyio.create_task_group() as tg:
            if runner is not None:
                await tg.start(runner.serve)
                if not settings.distributed:
                    # Embedded mode: the in-process queue died with the last process; resume what it held.
                    for run in await store.runs_with_status(RunStatus.QUEUED, RunStatus.RUNNING):
                        await queue.enqueue(run.id)
            try:
                yield braid
            finally:
                tg.cancel_scope.cancel()
