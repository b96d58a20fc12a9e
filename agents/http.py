"""The ``http`` agent: one HTTP request through the host's shared ``httpx.AsyncClient``.

The output is the response's parsed JSON when it is JSON, else its text. Timeouts, connection
errors, 408, 429 and 5xx are retryable; any other 4xx fails the node at once. The node's own
``timeout`` (an engine setting, per attempt) bounds the request: httpx is cancellation-aware.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, Literal

import httpx
from pydantic import Field, field_validator, model_validator

from agents.registry import AgentConfig, agent
from server.engine.context import NodeContext
from server.errors import NodeError, RetryableError
from server.graph.fields import TemplateField, TemplateTreeField

SNIPPET = 300
"""Characters of a failed response's body quoted in the error."""


class HTTPConfig(AgentConfig):
    """The fields of an ``http`` node."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    url: TemplateField
    headers: TemplateTreeField = None
    json_body: TemplateTreeField = Field(default=None, alias="json")
    body: TemplateField | None = None

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("headers", mode="before")
    @classmethod
    def _headers(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ValueError("must be a mapping of header names to values")
        for name, item in value.items():  # pyright: ignore[reportUnknownVariableType]
            if not isinstance(item, str | int | float):
                raise ValueError(f"header {name!r} must be a string (a template) or a number")
        return value

    @model_validator(mode="after")
    def _one_body(self) -> HTTPConfig:
        if self.json_body is not None and self.body is not None:
            raise ValueError("give at most one of `json` (a JSON value) and `body` (a text template)")
        return self


@agent("http", config=HTTPConfig)
async def http(config: HTTPConfig, ctx: NodeContext) -> Any:
    """Send the request; return the JSON or text body."""
    client = ctx.resources.get(httpx.AsyncClient)
    url = str(ctx.render(config.url)).strip()
    headers = {str(k): str(v) for k, v in ctx.render(config.headers).items()} if config.headers else None
    where = f"HTTP {config.method} {_shown(url)}"
    ctx.note(method=config.method, url=_shown(url))
    try:
        response = await client.request(
            config.method,
            url,
            headers=headers,
            json=ctx.render(config.json_body) if config.json_body is not None else None,
            content=str(ctx.render(config.body)).encode() if config.body is not None else None,
        )
    except httpx.TimeoutException as exc:
        raise RetryableError(f"{where} timed out ({type(exc).__name__})") from exc
    except (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError) as exc:
        raise RetryableError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise NodeError(f"{where} failed: {exc}; check the url") from exc

    status = response.status_code
    if status >= 400:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "error"
        snippet = " ".join(response.text[:SNIPPET].split())
        message = f"{where} returned {status} {phrase}" + (f": {snippet}" if snippet else "")
        if status in (408, 429) or status >= 500:
            raise RetryableError(message)
        raise NodeError(message)
    return _body(response)


def _body(response: httpx.Response) -> Any:
    if not response.content:
        return None
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json" or content_type.endswith("+json"):
        try:
            return response.json()
        except ValueError:
            pass  # a server that labels text as JSON: hand the text over as it is
    return response.text


def _shown(url: str) -> str:
    """The URL without its query string, which may carry tokens."""
    return url.split("?", 1)[0] if url else "(empty url)"
