"""The LLM clients: one shared ``openai.AsyncOpenAI`` per provider.

``model: "gpt-4o-mini"`` uses the default provider (OPENAI_API_KEY / OPENAI_BASE_URL, or the
offline mock model); ``model: "local/llama3"`` uses the named provider ``local`` when one is
configured (BRAID_PROVIDERS), else the whole string is a model id on the default provider (so
ids such as ``meta-llama/Llama-3-8b`` on OpenRouter keep working).

The clients never retry (``max_retries=0``): the engine's tenacity policy is the one retry layer.
"""

from __future__ import annotations

from collections.abc import Mapping

from openai import AsyncOpenAI


class LLMClients:
    """Shared OpenAI-compatible clients, one per provider; pass it to the engine in ``Resources``."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        default_model: str = "gpt-4o-mini",
        providers: Mapping[str, tuple[str, str]] | None = None,
        timeout: float = 600,
    ) -> None:
        """Build the clients.

        Args:
            base_url: the default provider's base URL, such as ``https://api.openai.com/v1``.
            api_key: the default provider's API key.
            default_model: the model of ``llm`` nodes that name none.
            providers: named providers, ``{name: (base_url, api_key)}``.
            timeout: seconds per HTTP request (the node's own timeout is usually shorter).
        """
        self.default_model = default_model
        self._default = self._client(base_url, api_key, timeout)
        self._providers: dict[str, AsyncOpenAI] = {
            name: self._client(url, key, timeout) for name, (url, key) in (providers or {}).items()
        }

    @staticmethod
    def _client(base_url: str, api_key: str, timeout: float) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0, timeout=timeout)

    @property
    def base_url(self) -> str:
        """The default provider's base URL."""
        return _url(self._default)

    def providers(self) -> list[str]:
        return sorted(self._providers)

    def resolve(self, model: str | None) -> tuple[AsyncOpenAI, str, str]:
        """The client, the model id and the base URL for a node's ``model`` (None: the default)."""
        model = model or self.default_model
        name, sep, model_id = model.partition("/")
        client = self._providers.get(name) if sep and model_id else None
        if client is not None:
            return client, model_id, _url(client)
        return self._default, model, _url(self._default)

    async def aclose(self) -> None:
        """Close every client's connections."""
        for client in (self._default, *self._providers.values()):
            await client.close()


def _url(client: AsyncOpenAI) -> str:
    return str(client.base_url).rstrip("/")
