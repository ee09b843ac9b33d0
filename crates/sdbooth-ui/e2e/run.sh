#!/usr/bin/env bash
# The browser end-to-end test of `sdbooth ui` (see ui.e2e.test.mjs). Needs Debian's chromium
# (`apt-get install chromium`), Node 18+ and npm; builds the release binary if missing.
set -euo pipefail
cd "$(dirname "$0")"
repo="$(cd ../../.. && pwd)"
export SDBOOTH="${SDBOOTH:-$repo/target/release/sdbooth}"
if [ ! -x "$SDBOOTH" ]; then
    (cd "$repo" && cargo build --release -p sdbooth)
fi
[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || { echo "no chromium at ${CHROMIUM:-/usr/bin/chromium}: apt-get install chromium" >&2; exit 1; }
[ -d node_modules/playwright-core ] || npm ci --no-audit --no-fund
node --test ui.e2e.test.mjs
