#!/usr/bin/env bash
# quickstart.sh — run infergate on a working default, no GPU needed:
# two mock engines on 127.0.0.1:18001 and :18002, infergate on :8080 with
# conf/quickstart.yaml. Ctrl-C stops everything. Used by `make run`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${BIN:-$ROOT/target/release}
CONFIG=${CONFIG:-$ROOT/conf/quickstart.yaml}
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/infergate-quickstart.XXXXXX")
pids=()
cleanup() {
  # SIGINT: the gateway's fast shutdown (SIGTERM would wait for its grace period)
  for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

for port in 18001 18002 8080; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "quickstart: 127.0.0.1:$port is already in use; stop what listens there first" >&2
    exit 1
  fi
done

"$BIN/mock-engine" --listen 127.0.0.1:18001 --model tiny-chat --model tiny-embed \
  --name engine-1 --token-interval-ms 50 >"$LOGS/engine-1.log" 2>&1 &
pids+=($!)
"$BIN/mock-engine" --listen 127.0.0.1:18002 --model tiny-chat \
  --name engine-2 --token-interval-ms 50 >"$LOGS/engine-2.log" 2>&1 &
pids+=($!)
"$BIN/infergate" --check --config "$CONFIG"
"$BIN/infergate" --config "$CONFIG" > >(tee "$LOGS/infergate.out") 2>"$LOGS/infergate.log" &
pids+=($!)

for _ in $(seq 1 200); do
  grep -q "infergate listening on" "$LOGS/infergate.out" 2>/dev/null && break
  kill -0 "${pids[2]}" 2>/dev/null || { cat "$LOGS/infergate.log" >&2; exit 1; }
  sleep 0.05
done
cat <<MSG

infergate is running on http://127.0.0.1:8080 (logs in $LOGS). Try:

  curl -s http://127.0.0.1:8080/v1/models
  curl -s http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model":"tiny-chat","messages":[{"role":"user","content":"hello"}]}'
  curl -sN http://127.0.0.1:8080/v1/chat/completions \\
    -d '{"model":"chat-latest","stream":true,"messages":[{"role":"user","content":"hello"}]}'

Press Ctrl-C to stop.
MSG
if grep -q "^  - auth:" "$CONFIG"; then
  cat <<MSG
This config requires a credential: add -H 'Authorization: Bearer <key>' to the commands above
(demo keys and users are listed at the top of $CONFIG), or log in first:
  curl -s http://127.0.0.1:8080/user/user_login -H 'Content-Type: application/json' \\
    -d '{"email":"test@example.com","password":"change-me-too-password"}'
MSG
fi
wait "${pids[2]}"
