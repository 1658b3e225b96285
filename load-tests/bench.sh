#!/usr/bin/env bash
# bench.sh — side-by-side overhead benchmark: the same mock engine reached
#   (a) directly, (b) through nginx, (c) through infergate,
# with small non-streaming chat completion POSTs from wrk, in one run.
# See load-tests/README.md for what is measured and how to read it.
#
# usage: load-tests/bench.sh [--smoke]
#   --smoke   3 s per run, 3 rounds (medians), short warm-up (the CI variant; see smoke.sh)
# env (defaults in brackets):
#   BENCH_DURATION [10s]   wrk -d for the throughput runs
#   BENCH_ROUNDS [3]       rounds; targets alternate order every round; medians reported
#   BENCH_CONNECTIONS [32] wrk -c for the throughput runs
#   BENCH_WRK_THREADS      wrk -t for the throughput runs [1 when wrk is pinned to one CPU, else 2]
#   BENCH_LAT_DURATION [5s] wrk -d for the 1-connection latency runs
#   BENCH_WARMUP [2s]      per-target warm-up before round 1
#   BENCH_PROXY_THREADS [2] nginx worker_processes and infergate server.threads
#   BENCH_TARGETS ["direct nginx gateway gateway-auth"]
#                          gateway-auth: a second infergate with cors + auth (hashed
#                          API key) + limits (global, per key, per model, all set high
#                          enough never to refuse) + a quota in a SQLite store
#   BENCH_BODY             request body (model must be mock-model)
#   BENCH_GATEWAY_CONFIG   a gateway YAML to use instead of the built-in one; the
#                          strings @MOCK_ADDR@ and @THREADS@ in it are substituted
#   BENCH_PIN [1]          0 = no taskset pinning
#   BENCH_OUT              result file [load-tests/results/<UTC timestamp>.json]
#   BENCH_KEEP             keep the temp dir (configs, logs, raw wrk output)
#   INFERGATE_BIN, MOCK_BIN  binaries [target/release/infergate, target/release/mock-engine]
# Everything listens on 127.0.0.1; every wait is bounded; everything started here is
# stopped on exit.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)

SMOKE=0
for a in "$@"; do
  case "$a" in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done

DURATION=${BENCH_DURATION:-10s}
ROUNDS=${BENCH_ROUNDS:-3}
LAT_DURATION=${BENCH_LAT_DURATION:-5s}
WARMUP=${BENCH_WARMUP:-2s}
if [ "$SMOKE" = 1 ]; then
  DURATION=3s; ROUNDS=${BENCH_ROUNDS:-3}; LAT_DURATION=${BENCH_LAT_DURATION:-2s}; WARMUP=${BENCH_WARMUP:-1s}
fi
CONNS=${BENCH_CONNECTIONS:-32}
PROXY_THREADS=${BENCH_PROXY_THREADS:-2}
TARGETS=${BENCH_TARGETS:-direct nginx gateway gateway-auth}
PIN=${BENCH_PIN:-1}
INFERGATE_BIN=${INFERGATE_BIN:-$REPO/target/release/infergate}
MOCK_BIN=${MOCK_BIN:-$REPO/target/release/mock-engine}
TS=$(date -u +%Y%m%dT%H%M%SZ)
if [ "$SMOKE" = 1 ]; then
  OUT=${BENCH_OUT:-$HERE/results/smoke-$TS.json}
else
  OUT=${BENCH_OUT:-$HERE/results/$TS.json}
fi
export BENCH_BODY=${BENCH_BODY:-'{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":8}'}
PY=${PYTHON:-python3}

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

secs() { # 10s | 2m | 10 -> seconds (integer)
  case "$1" in
    *ms) echo 1 ;;
    *s) echo "${1%s}" ;;
    *m) echo $(( ${1%m} * 60 )) ;;
    *) echo "$1" ;;
  esac
}
for v in "$DURATION" "$LAT_DURATION" "$WARMUP"; do
  [[ "$(secs "$v")" =~ ^[0-9]+$ ]] || die "bad duration '$v' (use e.g. 10s)"
done
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive integer"

UPTIME_START=$(uptime)
log "uptime: $UPTIME_START"

# ------------------------------------------------------------------ tools
NGINX=$(command -v nginx || true)
[ -z "$NGINX" ] && [ -x /usr/sbin/nginx ] && NGINX=/usr/sbin/nginx
need_targets() { case " $TARGETS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
missing=()
command -v wrk >/dev/null || missing+=(wrk)
if need_targets nginx && [ -z "$NGINX" ]; then missing+=(nginx-light); fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -q >&2
    timeout 300 apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    NGINX=$(command -v nginx || echo /usr/sbin/nginx)
  else
    die "missing ${missing[*]}; install them (Debian: apt-get install -y wrk nginx-light)"
  fi
fi
for t in curl "$PY" timeout; do command -v "$t" >/dev/null || die "missing $t"; done
[ -x "$MOCK_BIN" ] || die "no mock engine at $MOCK_BIN (cargo build --release --bins)"
if need_targets gateway; then
  [ -x "$INFERGATE_BIN" ] || die "no gateway at $INFERGATE_BIN (cargo build --release --bins)"
fi

# ------------------------------------------------------------------ CPU pinning
# 2-core layout: the mock on the last allowed CPU, wrk on the first; the proxies
# (nginx, infergate) are not pinned and share both, the same for both of them.
CPUS=$("$PY" -c 'import os; print(" ".join(map(str, sorted(os.sched_getaffinity(0)))))')
read -r -a CPU_LIST <<<"$CPUS"
MOCK_PIN=(); CLIENT_PIN=(); PINNING="none"
if [ "$PIN" = 1 ] && command -v taskset >/dev/null && [ ${#CPU_LIST[@]} -ge 2 ] &&
   taskset -c "${CPU_LIST[0]}" true 2>/dev/null; then
  MOCK_CPU=${CPU_LIST[$(( ${#CPU_LIST[@]} - 1 ))]}
  CLIENT_CPU=${CPU_LIST[0]}
  MOCK_PIN=(taskset -c "$MOCK_CPU"); CLIENT_PIN=(taskset -c "$CLIENT_CPU")
  PINNING="mock on CPU $MOCK_CPU, wrk on CPU $CLIENT_CPU, proxies unpinned"
fi
if [ -n "${BENCH_WRK_THREADS:-}" ]; then WRK_THREADS=$BENCH_WRK_THREADS
elif [ ${#CLIENT_PIN[@]} -gt 0 ]; then WRK_THREADS=1
else WRK_THREADS=2; fi
[ "$WRK_THREADS" -le "$CONNS" ] || WRK_THREADS=$CONNS
log "pinning: $PINNING; wrk -t$WRK_THREADS -c$CONNS"

# ------------------------------------------------------------------ processes
WORK=$(mktemp -d "${TMPDIR:-/tmp}/infergate-bench.XXXXXX")
PIDS=()
cleanup() {
  local rc=$? pid
  # SIGINT is Pingora's fast shutdown (SIGTERM would wait for its grace period)
  for pid in "${PIDS[@]}"; do
    if [[ " ${GW_PIDS[*]:-} " == *" $pid "* ]]; then kill -INT "$pid" 2>/dev/null || true
    else kill -TERM "$pid" 2>/dev/null || true; fi
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [ -n "${BENCH_KEEP:-}" ] || [ $rc != 0 ]; then
    log "work dir kept: $WORK"
  else
    rm -rf "$WORK"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
  "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

first_line() { # file pid what deadline_s -> prints the first non-empty line
  local f=$1 pid=$2 what=$3 n=$(( $4 * 10 )) line
  for _ in $(seq 1 "$n"); do
    line=$(grep -m1 . "$f" 2>/dev/null || true)
    if [ -n "$line" ]; then printf '%s\n' "$line"; return 0; fi
    kill -0 "$pid" 2>/dev/null || { log "$what exited early"; return 1; }
    sleep 0.1
  done
  log "$what printed nothing within $4 s"; return 1
}

export BENCH_KEY=${BENCH_KEY:-sk-bench-0000000000000000000000000000}
probe() { # url -> 0 when a chat completion POST answers 200 with a chat.completion
  local body
  body=$(curl -s -m 5 -H 'Content-Type: application/json' -H "Authorization: Bearer $BENCH_KEY" \
         -d "$BENCH_BODY" -w '\n%{http_code}' \
         "$1/v1/chat/completions" 2>/dev/null) || return 1
  [ "${body##*$'\n'}" = 200 ] && [[ "$body" == *'"chat.completion"'* ]]
}

wait_routed() { # url pid what deadline_s
  local n=$(( $4 * 5 ))
  for _ in $(seq 1 "$n"); do
    probe "$1" && return 0
    kill -0 "$2" 2>/dev/null || { log "$3 died"; return 1; }
    sleep 0.2
  done
  log "$3 did not answer 200 within $4 s"; return 1
}

# mock engine: one process, one thread, pinned; used by every target
"${MOCK_PIN[@]}" "$MOCK_BIN" --listen 127.0.0.1:0 --model mock-model --threads 1 \
    --ttft-ms 0 --token-interval-ms 0 >"$WORK/mock.out" 2>"$WORK/mock.err" &
MOCK_PID=$!; PIDS+=("$MOCK_PID")
MOCK_ADDR=$(first_line "$WORK/mock.out" "$MOCK_PID" mock-engine 20) || { cat "$WORK/mock.err" >&2; exit 1; }
wait_routed "http://$MOCK_ADDR" "$MOCK_PID" mock-engine 10 || { tail "$WORK/mock.err" >&2; exit 1; }
log "mock-engine pid $MOCK_PID on $MOCK_ADDR"
declare -A URL PROXY_PIDS
URL[direct]="http://$MOCK_ADDR"
PROXY_PIDS[direct]=""

if need_targets nginx; then
  mkdir -p "$WORK/nginx/logs" "$WORK/nginx/tmp"
  NGINX_VERSION=$("$NGINX" -v 2>&1 | head -1)
  started=0
  for _ in 1 2 3; do  # a free port can be taken before nginx binds it: retry
    NGINX_PORT=$(free_port)
    cat >"$WORK/nginx/nginx.conf" <<EOF
# written by load-tests/bench.sh
worker_processes $PROXY_THREADS;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log $WORK/nginx/logs/access.log combined buffer=64k flush=1s;
  client_body_temp_path $WORK/nginx/tmp/body;
  proxy_temp_path $WORK/nginx/tmp/proxy;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  upstream mock {
    server $MOCK_ADDR;
    keepalive 64;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    client_max_body_size 32m;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
EOF
    "$NGINX" -t -q -e "$WORK/nginx/logs/error.log" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" >&2 ||
      die "nginx rejected $WORK/nginx/nginx.conf"
    "$NGINX" -e "$WORK/nginx/logs/error.log" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" \
        >"$WORK/nginx/stdout" 2>&1 &
    NGINX_PID=$!
    if wait_routed "http://127.0.0.1:$NGINX_PORT" "$NGINX_PID" nginx 10; then started=1; break; fi
    kill "$NGINX_PID" 2>/dev/null || true; wait "$NGINX_PID" 2>/dev/null || true
  done
  [ "$started" = 1 ] || { tail "$WORK/nginx/logs/error.log" >&2; die "nginx did not start"; }
  PIDS+=("$NGINX_PID")
  URL[nginx]="http://127.0.0.1:$NGINX_PORT"
  PROXY_PIDS[nginx]="$NGINX_PID $(pgrep -P "$NGINX_PID" | tr '\n' ' ')"
  log "nginx pid $NGINX_PID (workers: $(pgrep -P "$NGINX_PID" | tr '\n' ' ')) on 127.0.0.1:$NGINX_PORT"
fi

start_gateway() { # target config-file
  local target=$1 cfg=$2 ready pid
  timeout 30 "$INFERGATE_BIN" --check --config "$cfg" >"$WORK/$target-check.out" 2>&1 ||
    { cat "$WORK/$target-check.out" >&2; die "infergate --check rejected $cfg"; }
  "$INFERGATE_BIN" --config "$cfg" >"$WORK/$target.out" 2>"$WORK/$target.err" &
  pid=$!; PIDS+=("$pid"); GW_PIDS+=("$pid")
  ready=$(first_line "$WORK/$target.out" "$pid" "$target" 30) || { tail -20 "$WORK/$target.err" >&2; exit 1; }
  [[ "$ready" == "infergate listening on http://"* ]] || die "unexpected gateway ready line: $ready"
  URL[$target]=${ready#infergate listening on }
  URL[$target]=${URL[$target]%/}
  # a backend gets traffic only after its first passing health check
  wait_routed "${URL[$target]}" "$pid" "$target" 20 || { tail -20 "$WORK/$target.err" >&2; exit 1; }
  PROXY_PIDS[$target]=$pid
  log "$target (infergate) pid $pid on ${URL[$target]}"
}
GW_PIDS=()

gateway_base() { # the plain gateway's YAML
  cat <<EOF
# written by load-tests/bench.sh
server:
  listen: "127.0.0.1:0"
  threads: $PROXY_THREADS
  max_request_body_bytes: 33554432
timeouts: { connect: 5s, first_byte: 300s, idle: 120s }
routing: { default_pool: chat }
pools:
  - name: chat
    models: ["mock-model"]
    backends: ["$MOCK_ADDR"]
    balance: round_robin
    health_check: { path: /health, interval: 1s }
EOF
}

if need_targets gateway; then
  GW_CFG=$WORK/infergate.yaml
  if [ -n "${BENCH_GATEWAY_CONFIG:-}" ]; then
    sed -e "s/@MOCK_ADDR@/$MOCK_ADDR/g" -e "s/@THREADS@/$PROXY_THREADS/g" "$BENCH_GATEWAY_CONFIG" >"$GW_CFG"
  else
    gateway_base >"$GW_CFG"
  fi
  start_gateway gateway "$GW_CFG"
fi

if need_targets gateway-auth; then
  KEY_HASH=$(printf '%s' "$BENCH_KEY" | sha256sum | cut -d' ' -f1)
  cat >"$WORK/keys.json" <<EOF
{"keys": [
  {"key": "sha256:$KEY_HASH", "user": "bench", "quota": 1000000000000,
   "limits": {"requests_per_second": 1000000, "concurrent": 100000, "tokens_per_minute": 1000000000000}},
  {"key": "sha256:$(printf other | sha256sum | cut -d' ' -f1)", "user": "other"}
]}
EOF
  { gateway_base; cat <<EOF
filters:
  - request_id: {}
  - cors: {}
  - auth: { api_keys_file: $WORK/keys.json, watch: true }
  - limits:
      global: { requests_per_second: 1000000, concurrent: 100000, tokens_per_minute: 1000000000000 }
      per_key: { requests_per_second: 1000000, concurrent: 100000 }
      models: { mock-model: { concurrent: 100000, tokens_per_minute: 1000000000000 } }
      data_dir: $WORK/data
EOF
  } >"$WORK/infergate-auth.yaml"
  start_gateway gateway-auth "$WORK/infergate-auth.yaml"
fi

# ------------------------------------------------------------------ measuring
CLK_TCK=$(getconf CLK_TCK)
cpu_s() { # pids... -> CPU seconds (user+sys) consumed so far, summed
  local t=0 pid f
  for pid in "$@"; do
    f=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null) || continue
    # shellcheck disable=SC2086  # split the stat fields on purpose
    set -- $f
    t=$(( t + ${12} + ${13} ))
  done
  "$PY" -c "print($t / $CLK_TCK)"
}

RUNS=$WORK/runs.jsonl
: >"$RUNS"
run_wrk() { # target mode round conns threads duration
  local target=$1 mode=$2 round=$3 c=$4 t=$5 d=$6 out p0 p1 m0 m1 j pcpu
  out=$WORK/wrk-$target-$mode-$round.txt
  # shellcheck disable=SC2086
  p0=$(cpu_s ${PROXY_PIDS[$target]}); m0=$(cpu_s "$MOCK_PID")
  timeout $(( $(secs "$d") + 60 )) "${CLIENT_PIN[@]}" wrk -t"$t" -c"$c" -d"$d" --timeout 5s --latency \
      -s "$HERE/chat.lua" "${URL[$target]}/v1/chat/completions" >"$out" 2>&1 ||
    { cat "$out" >&2; die "wrk failed against $target"; }
  # shellcheck disable=SC2086
  p1=$(cpu_s ${PROXY_PIDS[$target]}); m1=$(cpu_s "$MOCK_PID")
  j=$(sed -n 's/^BENCHJSON //p' "$out")
  [ -n "$j" ] || { cat "$out" >&2; die "no summary from wrk ($target)"; }
  if [ -n "${PROXY_PIDS[$target]}" ]; then pcpu=$("$PY" -c "print(round($p1 - $p0, 3))"); else pcpu=null; fi
  printf '{"target":"%s","mode":"%s","round":%d,"connections":%d,"wrk_threads":%d,"duration":"%s","proxy_cpu_s":%s,"mock_cpu_s":%s,"wrk":%s}\n' \
    "$target" "$mode" "$round" "$c" "$t" "$d" "$pcpu" "$("$PY" -c "print(round($m1 - $m0, 3))")" "$j" >>"$RUNS"
  "$PY" -c '
import json, sys
r = json.loads(sys.argv[1]); w = r["wrk"]; e = w["errors"]
print("[bench]   %-8s %-4s round %d: %9.0f req/s  p50 %6d us  p99 %6d us  non-2xx %d  socket errors %d" % (
    r["target"], r["mode"], r["round"], w["requests"] / (w["duration_us"] / 1e6), w["latency_us"]["p50"],
    w["latency_us"]["p99"], e["status"], e["connect"] + e["read"] + e["write"] + e["timeout"]), file=sys.stderr)
' "$(tail -1 "$RUNS")"
}

read -r -a TLIST <<<"$TARGETS"
for t in "${TLIST[@]}"; do [ -n "${URL[$t]:-}" ] || die "unknown target $t"; done

log "warm-up: $WARMUP per target"
for t in "${TLIST[@]}"; do
  timeout $(( $(secs "$WARMUP") + 60 )) "${CLIENT_PIN[@]}" wrk -t"$WRK_THREADS" -c"$CONNS" -d"$WARMUP" \
      -s "$HERE/chat.lua" "${URL[$t]}/v1/chat/completions" >"$WORK/warmup-$t.txt" 2>&1 ||
    die "warm-up against $t failed"
done

n=${#TLIST[@]}
for r in $(seq 1 "$ROUNDS"); do
  order=()
  for i in $(seq 0 $(( n - 1 ))); do order+=("${TLIST[$(( (i + r - 1) % n ))]}"); done
  log "round $r/$ROUNDS: ${order[*]} ($DURATION, $CONNS connections), then 1 connection ($LAT_DURATION)"
  for t in "${order[@]}"; do run_wrk "$t" load "$r" "$CONNS" "$WRK_THREADS" "$DURATION"; done
  for t in "${order[@]}"; do run_wrk "$t" c1 "$r" 1 1 "$LAT_DURATION"; done
done

for t in "${TLIST[@]}"; do
  [ "$t" = direct ] && continue
  pid=${PROXY_PIDS[$t]%% *}
  kill -0 "$pid" 2>/dev/null || die "$t (pid $pid) died during the run"
done

UPTIME_END=$(uptime)
log "uptime: $UPTIME_END"
GIT_REV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo none)
"$PY" - "$WORK/meta.json" "$BENCH_BODY" <<EOF
import json, sys
json.dump({
  "timestamp": "$TS", "smoke": $SMOKE == 1, "rounds": $ROUNDS, "duration": "$DURATION",
  "lat_duration": "$LAT_DURATION", "warmup": "$WARMUP", "connections": $CONNS,
  "wrk_threads": $WRK_THREADS, "proxy_threads": $PROXY_THREADS, "targets": "$TARGETS".split(),
  "body": sys.argv[2], "pinning": "$PINNING", "nproc": $(nproc),
  "uptime_start": """$UPTIME_START""", "uptime_end": """$UPTIME_END""",
  "kernel": "$(uname -r)", "wrk": """$(wrk -v 2>&1 | head -1)""",
  "nginx": """${NGINX_VERSION:-}""", "git_rev": "$GIT_REV",
  "infergate_bin": "$INFERGATE_BIN", "mock_bin": "$MOCK_BIN",
  "mock": "mock-engine --threads 1 --ttft-ms 0 --token-interval-ms 0 (one process for all targets)",
}, open(sys.argv[1], "w"), indent=2)
EOF
mkdir -p "$(dirname "$OUT")"
"$PY" "$HERE/report.py" summarize "$RUNS" "$WORK/meta.json" "$OUT"
log "results: $OUT"
