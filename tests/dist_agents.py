"""A side-effect agent for the distributed tests (loaded with BRAID_AGENT_MODULES=tests.dist_agents).

``count`` appends ``run_id node iteration pid`` to a Redis list for every execution, so a test
can tell how often each node really ran, and in which worker process. The list lives at
BRAID_TEST_FX_KEY on BRAID_TEST_FX_REDIS (outside Braid's own key prefix, so simulating Redis
data loss for Braid's keys keeps the tally).
"""

from __future__ import annotations

import os

from redis.asyncio import Redis

from agents import AgentConfig, NodeContext, agent


@agent("count", config=AgentConfig)
async def count(config: AgentConfig, ctx: NodeContext) -> dict[str, int]:
    """Record this execution; the output names the process that ran it."""
    pid = os.getpid()
    redis = Redis.from_url(os.environ["BRAID_TEST_FX_REDIS"])
    try:
        await redis.rpush(os.environ["BRAID_TEST_FX_KEY"], f"{ctx.run_id} {ctx.node} {ctx.iteration} {pid}")
    finally:
        await redis.aclose()
    return {"pid": pid}
