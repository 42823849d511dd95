#!/usr/bin/env bash
# Install the pinned Mermaid parser (package-lock.json) into tests/mermaid/node_modules (git-ignored),
# once: again only when the lock file changed. Needs node and npm; registry access on the first run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
stamp=node_modules/.macp-installed
if [ -f "$stamp" ] && [ ! package-lock.json -nt "$stamp" ]; then
  exit 0
fi
# PUPPETEER_SKIP_DOWNLOAD: nothing here needs a browser (belt and braces; mermaid does not pull puppeteer).
PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error >&2
touch "$stamp"
