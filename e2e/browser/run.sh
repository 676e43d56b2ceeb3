#!/usr/bin/env bash
# Runs the headless-Chromium e2e suite: setup, then `node --test` on
# e2e/browser/*.test.mjs (or the files given as arguments), one file at a time,
# under a hard `timeout -s KILL`. Exits non-zero on any failure.
#
# Environment:
#   OPENCALLS_BIN      server binary (default: <repo>/target/debug/opencalls;
#                      built with `cargo build -p opencalls-server` if missing)
#   E2E_TIMEOUT_SECS   hard limit for the whole run (default 600)
#   E2E_ARTIFACTS_DIR  server logs and failure evidence (default e2e/browser/artifacts/run-<time>)
#   RUST_LOG           server log filter (default opencalls*=debug,warn)
#
# Files named netns-*.test.mjs change packet filtering (nftables): they run after the
# others, inside a network namespace of their own (loopback only), created and removed
# here; they need root and `nft` (setup.sh installs nftables).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

"$HERE/setup.sh" || { echo "run.sh: setup failed" >&2; exit 2; }

export PATH="$HERE/.node/bin:$PATH"   # node 20 fetched by setup.sh, if it had to
export OPENCALLS_BIN="${OPENCALLS_BIN:-$REPO/target/debug/opencalls}"
if [ ! -x "$OPENCALLS_BIN" ]; then
  if command -v cargo >/dev/null 2>&1; then
    echo "run.sh: $OPENCALLS_BIN missing, building it" >&2
    (cd "$REPO" && cargo build -p opencalls-server) || exit 2
  else
    echo "run.sh: $OPENCALLS_BIN missing and no cargo to build it" >&2
    exit 2
  fi
fi

cd "$HERE"
# One artifacts directory per run (server logs, failure evidence); keep the last 10.
export E2E_ARTIFACTS_DIR="${E2E_ARTIFACTS_DIR:-$HERE/artifacts/run-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$E2E_ARTIFACTS_DIR"
ls -1d "$HERE"/artifacts/run-* 2>/dev/null | sort | head -n -10 | xargs -r rm -rf

if [ "$#" -gt 0 ]; then all=("$@"); else all=(*.test.mjs); fi
files=(); nsfiles=()
for f in "${all[@]}"; do
  case "$(basename "$f")" in netns-*) nsfiles+=("$f") ;; *) files+=("$f") ;; esac
done
limit="${E2E_TIMEOUT_SECS:-600}"

# Human-readable spec output on stdout, and TAP in the artifacts directory whose
# summary ("# tests N", "# pass N", "# fail N", ...) is printed at the end.
tap="$E2E_ARTIFACTS_DIR/results.tap"
flags=(--test --test-reporter=spec --test-reporter-destination=stdout
       --test-reporter=tap --test-reporter-destination="$tap")
# One test file at a time: each starts its own server and browser, on 2 cores.
if node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=10)?0:1)'; then
  flags+=(--test-concurrency=1)
fi

# Runs node --test on the given files under a hard limit, in its own process group (job
# control), so that whatever a killed run leaves behind (servers, browsers) goes with it.
# Usage: run_node TAP [PREFIX...] -- FILE...
run_node() {
  local out="$1"; shift
  local prefix=()
  while [ "$1" != "--" ]; do prefix+=("$1"); shift; done
  shift
  set -m
  "${prefix[@]}" timeout -s KILL "$limit" node "${flags[@]/$tap/$out}" "$@" &
  group=$!
  set +m
  trap 'kill -KILL -- -"$group" 2>/dev/null; exit 130' INT TERM
  wait "$group"
  local rc=$?
  trap - INT TERM
  kill -KILL -- -"$group" 2>/dev/null
  [ "$rc" = 137 ] && echo "run.sh: KILLED after the ${limit}s limit (E2E_TIMEOUT_SECS)" >&2
  return "$rc"
}

start=$(date +%s)
rc=0
if [ "${#files[@]}" -gt 0 ]; then
  run_node "$tap" -- "${files[@]}" || rc=$?
fi
nstap="$E2E_ARTIFACTS_DIR/results-netns.tap"
if [ "${#nsfiles[@]}" -gt 0 ]; then
  NS="opencalls-e2e-browser-$$"
  if ip netns add "$NS" && ip -n "$NS" link set lo up; then
    run_node "$nstap" ip netns exec "$NS" env OPENCALLS_E2E_NETNS=1 -- "${nsfiles[@]}" || rc=$?
  else
    echo "run.sh: cannot create network namespace $NS (root needed) for ${nsfiles[*]}" >&2
    echo "# fail 1" > "$nstap"
    rc=1
  fi
  ip netns del "$NS" 2>/dev/null
fi
end=$(date +%s)
echo
echo "node --test summary:"
if [ "${#files[@]}" -gt 0 ]; then
  grep -E '^# (tests|suites|pass|fail|cancelled|skipped|todo|duration_ms) ' "$tap" 2>/dev/null || { echo "# (no summary: node did not finish)"; rc=1; }
fi
if [ "${#nsfiles[@]}" -gt 0 ]; then
  echo "in a network namespace (${nsfiles[*]}):"
  grep -E '^# (tests|pass|fail) ' "$nstap" 2>/dev/null || { echo "# (no summary: node did not finish)"; rc=1; }
fi
echo "run.sh: $(( ${#files[@]} + ${#nsfiles[@]} )) file(s), exit code $rc, $((end - start)) s wall time; logs and evidence in $E2E_ARTIFACTS_DIR"
exit "$rc"
