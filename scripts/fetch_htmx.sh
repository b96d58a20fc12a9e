#!/usr/bin/env bash
# Fetch the pinned htmx 2 and its SSE extension from the npm registry into web/static/vendor/
# (not committed). Idempotent: does nothing when the pinned versions are already there.
set -euo pipefail

HTMX_VERSION="2.0.11"     # newest htmx.org 2.0.x (htmx 4 changed the SSE API)
SSE_VERSION="2.2.4"       # newest htmx-ext-sse 2.2.x

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
vendor="$root/web/static/vendor"
stamp="$vendor/VERSIONS"
want="htmx.org@$HTMX_VERSION htmx-ext-sse@$SSE_VERSION"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -s "$vendor/htmx.min.js" && -s "$vendor/sse.js" ]]; then
    exit 0
fi

command -v npm >/dev/null 2>&1 || { echo "fetch_htmx.sh: npm is needed to fetch htmx (apt-get install npm)" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "htmx.org@$HTMX_VERSION" "htmx-ext-sse@$SSE_VERSION" >/dev/null)
mkdir -p "$tmp/htmx" "$tmp/sse"
tar -xzf "$tmp/htmx.org-$HTMX_VERSION.tgz" -C "$tmp/htmx"
tar -xzf "$tmp/htmx-ext-sse-$SSE_VERSION.tgz" -C "$tmp/sse"

mkdir -p "$vendor"
cp "$tmp/htmx/package/dist/htmx.min.js" "$vendor/htmx.min.js"
if [[ -f "$tmp/sse/package/dist/sse.min.js" ]]; then
    cp "$tmp/sse/package/dist/sse.min.js" "$vendor/sse.js"
else
    cp "$tmp/sse/package/sse.js" "$vendor/sse.js"
fi
echo "$want" > "$stamp"
echo "fetched $want into web/static/vendor/"
