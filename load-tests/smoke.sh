#!/usr/bin/env bash
# smoke.sh — the CI variant of the performance ladder (make smoke, part of make test):
# scenario (a) at 64 connections and (c) at 1 and 256 streams, direct / nginx /
# infergate with everything on, 3 alternating rounds, medians; about two minutes.
# Checks ratios only, never a time: infergate >= SMOKE_MIN_OVER_NGINX x nginx and
# >= SMOKE_MIN_OVER_DIRECT x direct throughput, 0 coalesced chunks at 1 stream (and < 25 % at 256), 0 errors,
# every aborted stream closed upstream. See load-tests/README.md.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# floors from the spread measured on these shared 2-core machines (docs/performance.md)
export SMOKE_MIN_OVER_NGINX=${SMOKE_MIN_OVER_NGINX:-0.25}
export SMOKE_MIN_OVER_DIRECT=${SMOKE_MIN_OVER_DIRECT:-0.15}
exec timeout 900 python3 "$HERE/ladder.py" --smoke "$@"
