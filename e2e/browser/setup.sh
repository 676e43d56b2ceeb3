#!/usr/bin/env bash
# Installs what the headless-Chromium e2e tests need, idempotently:
#   - Debian's chromium (apt; `apt-get update` only when it is missing),
#   - node + npm if absent (Debian 12's nodejs works; node 20 is what we use),
#   - the pinned npm packages from package-lock.json (playwright-core, partytracks,
#     esbuild), re-installed only when the lockfile changed.
# No browser download: playwright-core drives /usr/bin/chromium.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    $SUDO apt-get update
    apt_updated=1
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
}

if [ ! -x /usr/bin/chromium ]; then
  echo "setup: installing chromium" >&2
  # Recommended packages stay in: they bring the fonts chromium renders with.
  if [ "$apt_updated" = 0 ]; then $SUDO apt-get update; apt_updated=1; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "setup: installing nodejs and npm" >&2
  apt_install nodejs npm
fi

cd "$HERE"
stamp=node_modules/.opencalls-e2e-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: npm ci" >&2
  npm ci --no-audit --no-fund --loglevel=error
  echo "$want" > "$stamp"
fi

# Fail early, with a clear message, if the pieces are not usable.
node -e "require('playwright-core'); require('esbuild')" >/dev/null
/usr/bin/chromium --version 2>/dev/null | grep -qi chromium
