# Braid's image: `braid serve` (the API) or `braid worker`; compose.yaml runs both.
#   docker build -t braid .
#   docker run -p 8000:8000 braid                    # embedded mode, SQLite inside the container
#   docker compose up --scale worker=4               # distributed mode (see compose.yaml)

# htmx and its SSE extension, at the versions scripts/fetch_htmx.sh pins, from the npm registry.
FROM node:22-slim AS htmx
WORKDIR /src
COPY scripts/fetch_htmx.sh scripts/fetch_htmx.sh
RUN bash scripts/fetch_htmx.sh

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_PROJECT_ENVIRONMENT=/app/.venv
RUN pip install --no-cache-dir "uv==0.13.8"
WORKDIR /app

# The locked dependencies first, in their own layer: code changes do not reinstall them.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --locked --no-dev --no-install-project

COPY server ./server
COPY agents ./agents
COPY web ./web
COPY prompts ./prompts
COPY examples ./examples
COPY --from=htmx /src/web/static/vendor ./web/static/vendor
RUN uv sync --locked --no-dev \
    && useradd --system --create-home --home-dir /home/braid braid \
    && mkdir -p /app/data && chown braid /app/data

USER braid
ENV PATH="/app/.venv/bin:$PATH" \
    BRAID_HOST=0.0.0.0 \
    BRAID_PORT=8000 \
    BRAID_PROMPTS_DIR=/app/prompts \
    BRAID_DATABASE_URL=sqlite+aiosqlite:////app/data/braid.db
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["braid", "serve", "--host", "0.0.0.0", "--port", "8000"]
