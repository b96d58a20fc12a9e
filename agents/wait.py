"""The ``wait`` kind: a timer. It sleeps ``seconds`` and can be cancelled at any moment."""

from __future__ import annotations

import anyio
from pydantic import Field

from agents.registry import AgentConfig, agent
from server.engine.context import NodeContext

MAX_SECONDS = 86_400


class WaitConfig(AgentConfig):
    seconds: float = Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)


@agent("wait", config=WaitConfig)
async def wait(config: WaitConfig, ctx: NodeContext) -> dict[str, float]:
    """Sleep ``seconds``; the output is ``{"waited": seconds}``."""
    await anyio.sleep(config.seconds)
    return {"waited": config.seconds}
