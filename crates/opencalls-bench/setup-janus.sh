#!/usr/bin/env bash
# Installs Janus (Debian package `janus`, 1.1.2 on Debian 12) for the benchmark's Janus target.
# Idempotent: does nothing but the version check when the package is already installed.
# The package's own service is NOT used (the bench starts janus with a generated config);
# on a systemd host you may want `systemctl disable --now janus`.
set -euo pipefail

EXPECTED="1.1.2"

if dpkg -s janus >/dev/null 2>&1; then
  echo "janus: package already installed"
else
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup-janus.sh: need root to apt-get install janus" >&2
    exit 1
  fi
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends janus
fi

PKG_VERSION="$(dpkg-query -W -f='${Version}' janus)"
# (`janus --version` prints the version but exits 1, hence the `|| true`.)
BIN_VERSION="$( (/usr/bin/janus --version 2>/dev/null || true) | sed -n 's/^Janus version: [0-9]* (\(.*\))$/\1/p' | head -n1)"
echo "janus package version: ${PKG_VERSION}"
echo "janus binary version:  ${BIN_VERSION:-unknown}"

case "${BIN_VERSION}" in
  "${EXPECTED}") ;;
  *) echo "WARNING: expected Janus ${EXPECTED} (Debian 12); the bench was written against it" >&2 ;;
esac

# What the bench needs from the package: the videoroom plugin and the HTTP transport.
VIDEOROOM="$(dpkg -L janus | grep '/plugins/libjanus_videoroom.so$' | head -n1 || true)"
if [ -z "${VIDEOROOM}" ]; then
  echo "setup-janus.sh: the janus package has no videoroom plugin" >&2
  exit 1
fi
LIB="$(dirname "$(dirname "${VIDEOROOM}")")"
for f in plugins/libjanus_videoroom.so transports/libjanus_http.so; do
  if [ ! -e "${LIB}/${f}" ]; then
    echo "setup-janus.sh: ${LIB}/${f} missing" >&2
    exit 1
  fi
done
echo "janus libraries: ${LIB}"

# Tools the bench uses around janus (util-linux: taskset, unshare; iproute2: ip).
for t in taskset unshare ip; do
  command -v "$t" >/dev/null 2>&1 || echo "WARNING: '$t' not found (needed for pinning / the network namespace)" >&2
done
