"""The ``llm`` agent: one chat completion through the openai SDK (any OpenAI-compatible server).

Streams ``node.delta`` text per chunk (``stream: true``, the default), records token usage, and
returns the reply's text, or its JSON (``output: json``), or its JSON validated against a schema
(``output: {JSON Schema}``, sent as structured output). A reply that fails to parse or validate
is a retryable error, so the engine asks again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Annotated, Any, Literal, cast

import jsonschema
import openai
from jsonschema.exceptions import best_match
from jsonschema.validators import validator_for
from pydantic import Field, PlainSerializer, PlainValidator, ValidationInfo, WithJsonSchema, model_validator

from agents.providers import LLMClients
from agents.registry import AgentConfig, agent
from server.engine.context import NodeContext
from server.errors import NodeError, RetryableError
from server.graph.expressions import Template
from server.graph.fields import TemplateField, validation_context


@dataclass(frozen=True, slots=True)
class PromptFile:
    """A prompt file of the prompts folder, compiled when the graph was validated."""

    name: str
    template: Template


def _prompt_file(value: Any, info: ValidationInfo) -> PromptFile:
    if isinstance(value, PromptFile):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be the name of a file in the prompts folder, such as research.j2")
    return PromptFile(value, validation_context(info).load_prompt(value))


PromptFileField = Annotated[
    PromptFile,
    PlainValidator(_prompt_file),
    PlainSerializer(lambda p: p.name),
    WithJsonSchema({"type": "string"}),
]
"""The name of a Jinja2 prompt file in the prompts folder, loaded and compiled at validation."""

Output = Literal["text", "json"] | dict[str, Any]


def _output(value: Any) -> Output:
    if value in ("text", "json"):
        return value
    if isinstance(value, dict):
        schema = cast(dict[str, Any], value)
        try:
            validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            where = "/".join(str(p) for p in exc.path)
            raise ValueError(
                f"not a valid JSON Schema: {exc.message}" + (f" (at {where})" if where else "")
            ) from None
        return schema
    raise ValueError("must be text, json or a JSON Schema object")


OutputField = Annotated[
    Output,
    PlainValidator(_output),
    WithJsonSchema({"anyOf": [{"enum": ["text", "json"]}, {"type": "object"}]}),
]


class LLMConfig(AgentConfig):
    """The fields of an ``llm`` node."""

    model: str | None = None
    system: TemplateField | None = None
    prompt: TemplateField | None = None
    system_file: PromptFileField | None = None
    prompt_file: PromptFileField | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    output: OutputField = "text"
    stream: bool = True

    @model_validator(mode="after")
    def _one_prompt(self) -> LLMConfig:
        if (self.prompt is None) == (self.prompt_file is None):
            raise ValueError(
                "give exactly one of `prompt` (a template) or `prompt_file` (a file in prompts/)"
            )
        if self.system is not None and self.system_file is not None:
            raise ValueError("give at most one of `system` and `system_file`")
        return self

    @property
    def prompt_template(self) -> Template:
        return self.prompt_file.template if self.prompt_file is not None else cast(Template, self.prompt)

    @property
    def system_template(self) -> Template | None:
        return self.system_file.template if self.system_file is not None else self.system


@agent("llm", config=LLMConfig)
async def llm(config: LLMConfig, ctx: NodeContext) -> Any:
    """Call the model and return its text, or its JSON when ``output`` asks for JSON."""
    client, model, base_url = ctx.resources.get(LLMClients).resolve(config.model)
    system = str(ctx.render(config.system_template)) if config.system_template is not None else None
    prompt = str(ctx.render(config.prompt_template))
    # Noted before the call, so a failing call still shows what was sent.
    ctx.note(model=model, base_url=base_url, system=system, prompt=prompt)
    messages: list[dict[str, str]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})

    params: dict[str, Any] = {"model": model, "messages": messages}
    if config.temperature is not None:
        params["temperature"] = config.temperature
    if config.max_tokens is not None:
        params["max_tokens"] = config.max_tokens
    if isinstance(config.output, dict):
        params["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": config.output, "strict": False},
        }
    elif config.output == "json":
        params["response_format"] = {"type": "json_object"}

    try:
        text = await (_streamed(client, params, ctx) if config.stream else _whole(client, params, ctx))
    except openai.APIError as exc:
        raise _failure(exc, model, base_url) from exc
    return parse_output(text, config.output)


async def _streamed(client: openai.AsyncOpenAI, params: dict[str, Any], ctx: NodeContext) -> str:
    parts: list[str] = []
    stream = await client.chat.completions.create(
        **params, stream=True, stream_options={"include_usage": True}
    )
    async with stream:
        async for chunk in stream:
            if chunk.usage is not None:
                _record_usage(ctx, chunk.usage)
            for choice in chunk.choices:
                if choice.index == 0 and choice.delta.content:
                    parts.append(choice.delta.content)
                    await ctx.delta(choice.delta.content)
    return "".join(parts)


async def _whole(client: openai.AsyncOpenAI, params: dict[str, Any], ctx: NodeContext) -> str:
    completion = await client.chat.completions.create(**params, stream=False)
    if completion.usage is not None:
        _record_usage(ctx, completion.usage)
    if not completion.choices:
        return ""
    text = completion.choices[0].message.content or ""
    await ctx.delta(text)
    return text


def _record_usage(ctx: NodeContext, usage: Any) -> None:
    ctx.add_usage(
        {
            "prompt_tokens": usage.prompt_tokens or 0,
            "completion_tokens": usage.completion_tokens or 0,
            "total_tokens": usage.total_tokens or 0,
        }
    )


_FENCE = re.compile(r"^```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)


def parse_output(text: str, output: Output) -> Any:
    """The node's output from the reply: the text, or its JSON (checked against a schema)."""
    if output == "text":
        return text
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1).strip()
    schema = output if isinstance(output, dict) else None
    what = "for the output schema" if schema is not None else "(output: json)"
    try:
        value = json.loads(stripped)
    except ValueError as exc:
        raise RetryableError(
            f"model reply is not valid JSON {what}: {exc}; the reply began {text[:200]!r}"
        ) from None
    if schema is not None:
        error = best_match(validator_for(schema)(schema).iter_errors(value))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path)
            detail = error.message + (f" (at {where})" if where else "")
            raise RetryableError(f"model reply is not valid JSON for the output schema: {detail}")
    return value


def _failure(exc: openai.APIError, model: str, base_url: str) -> NodeError:
    """A NodeError naming the model and the server; retryable when another attempt may succeed."""
    where = f"LLM call to model {model!r} at {base_url} failed"
    if isinstance(exc, openai.APITimeoutError):
        return RetryableError(f"{where}: the request timed out")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        detail = f" ({type(cause).__name__}: {cause})" if cause is not None and str(cause) else ""
        return RetryableError(f"{where}: cannot connect{detail}; is the server running?")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "error"
        message = f"{where}: {status} {phrase}: {_server_message(exc)}"
        if status == 429 or status >= 500 or status == 408:
            return RetryableError(message)
        hint = {401: " (check the API key)", 404: " (check the model name and the base URL)"}.get(status, "")
        return NodeError(message + hint)
    # An error event inside a stream: the server broke off mid-reply; another attempt may work.
    return RetryableError(f"{where}: {exc.message}")


def _server_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        message = cast(dict[str, Any], body).get("message")
        if message:
            return str(message)[:500]
    if isinstance(body, str) and body:
        return body[:500]
    try:
        return exc.response.text[:500] or exc.message
    except Exception:  # the streamed body was not read
        return exc.message
