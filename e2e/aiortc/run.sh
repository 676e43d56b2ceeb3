#!/usr/bin/env bash
# Runs the aiortc + GStreamer end-to-end suite inside a network namespace of its own
# (loopback plus one veth address, 10.213.0.1, that exists only inside it), so GStreamer's
# libnice has a candidate and no traffic can leave the namespace. Needs root (CI is root).
# Usage: e2e/aiortc/run.sh PYTHON  (a python with requirements.txt installed)
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="$1"
NS="opencalls-e2e-$$"
cleanup() { ip netns del "$NS" 2>/dev/null || true; }
trap cleanup EXIT
ip netns add "$NS" || { echo "FAIL: cannot create network namespace (root needed)"; exit 1; }
ip -n "$NS" link set lo up
ip -n "$NS" link add oc0 type veth peer name oc1
ip -n "$NS" addr add 10.213.0.1/24 dev oc0
ip -n "$NS" link set oc0 up
ip -n "$NS" link set oc1 up
cd "$HERE"
ip netns exec "$NS" env OPENCALLS_E2E_IP=10.213.0.1 timeout -s KILL 600 \
  "$PY" -m pytest -p no:cacheprovider -v .
