#!/usr/bin/env bash
# smoke.sh — the CI variant of bench.sh: three short rounds, medians (bench.sh --smoke), then
# ratio checks only, no wall-clock thresholds:
#   * infergate throughput >= SMOKE_MIN_GATEWAY_RATIO (default 0.15) x direct
#   * infergate throughput >= SMOKE_MIN_GATEWAY_OVER_NGINX (default 0.4) x nginx
#     (the direct mock is a tiny 1-thread Rust server doing ~100k req/s here; two extra
#     loopback hops cost any proxy most of that, so nginx is the steadier yardstick)
#   * infergate with auth + limits + quota >= SMOKE_MIN_AUTH_RATIO (default 0.4) x infergate
#     without them
#   * every target: 0 non-2xx responses and 0 socket errors, in every run
# Exits non-zero, saying why, when a check fails or the benchmark cannot run.
# env: everything bench.sh reads; SMOKE_MIN_GATEWAY_RATIO; BENCH_OUT (default
#      load-tests/results/smoke-<UTC timestamp>.json, git-ignored)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${BENCH_OUT:-$HERE/results/smoke-$(date -u +%Y%m%dT%H%M%SZ).json}
export BENCH_OUT=$OUT
# all targets, whatever the caller's BENCH_TARGETS says: the checks need them
export BENCH_TARGETS="direct nginx gateway gateway-auth"
if ! timeout 600 "$HERE/bench.sh" --smoke; then
  echo "SMOKE FAILED: bench.sh --smoke did not complete (see the messages above)" >&2
  exit 1
fi
exec "${PYTHON:-python3}" "$HERE/report.py" check "$OUT" \
  --min-gateway-ratio "${SMOKE_MIN_GATEWAY_RATIO:-0.15}" \
  --min-gateway-over-nginx "${SMOKE_MIN_GATEWAY_OVER_NGINX:-0.4}" \
  --min-auth-ratio "${SMOKE_MIN_AUTH_RATIO:-0.4}"
