# Braid: `make run` serves the dashboard, API, examples and the offline mock model (embedded mode);
# `make test` runs the whole suite. Both bootstrap uv, the locked environment and htmx themselves.

SHELL := /bin/bash
# uv on PATH, else the one `make uv` installs from PyPI into this python (run as `python3 -m uv`).
UV ?= $(shell command -v uv 2>/dev/null || echo python3 -m uv)

.PHONY: run test lint format bench setup uv env static chromium services clean

run: setup
	$(UV) run braid serve

test: setup chromium
	$(UV) run pytest $(PYTEST_ARGS)

lint: env
	$(UV) run ruff check server agents tests bench
	$(UV) run ruff format --check server agents tests bench
	$(UV) run pyright

format: env
	$(UV) run ruff format server agents tests bench
	$(UV) run ruff check --fix server agents tests bench

bench: setup
	$(UV) run --locked --group bench python -m bench

setup: env static

# uv itself, from PyPI, when it is not installed yet.
uv:
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet "uv==0.13.8" \
		|| python3 -m pip install --quiet --user --break-system-packages "uv==0.13.8"

env: uv
	$(UV) sync --locked

# htmx 2 and its SSE extension, pinned, from the npm registry (never a CDN at run time).
static:
	@bash scripts/fetch_htmx.sh

# Debian's chromium for the browser tests (Playwright drives it; it never downloads a browser).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
		|| echo "warning: could not install chromium; browser tests will be skipped"; }

clean:
	rm -rf .venv web/static/vendor braid.db braid.db-wal braid.db-shm test-artifacts
