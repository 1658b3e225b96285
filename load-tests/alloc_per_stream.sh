#!/usr/bin/env bash
# alloc_per_stream.sh [N]: heap bytes an idle stream holds in infergate, by allocation size.
#
# Starts a mock engine that sends one token and then waits, and infergate with everything on
# (load-tests/configs/infergate-all.yaml); puts uprobes on jemalloc's allocation entry points
# in target/release/infergate (_rjem_malloc, _rjem_mallocx, _rjem_rallocx: + size;
# _rjem_sdallocx: − size; Rust frees with a size); records them while `loadgen hold` opens N
# streams (default 200); prints the net bytes per stream by size. Needs root, perf with uprobe
# support, and the release binaries (cargo build --release --bins). Not part of any test: a
# diagnostic behind docs/performance.md's memory table. `--stacks` also prints the call stack
# of each of the largest sizes (perf --call-graph dwarf: slow, large perf.data). KEEP=1 keeps
# the work directory and the probes.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-200}
STACKS=0; [ "${2:-}" = "--stacks" ] && STACKS=1
B=$PWD/target/release
W=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; [ -n "${KEEP:-}" ] || perf probe -q -d 'probe_infergate:*' 2>/dev/null || true; if [ -n "${KEEP:-}" ]; then echo "work dir kept: $W" >&2; else rm -rf "$W"; fi; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MOCK=$(port); GW=$(port); KEY=sk-bench-0000000000000000000000000000
"$B/mock-engine" --listen 127.0.0.1:$MOCK --model mock-hold --threads 1 --ttft-ms 0 \
  --token-interval-ms 3600000 --tokens 2 > "$W/mock.log" 2>&1 & pids+=($!)
sed -e "s#@MOCK@#127.0.0.1:$MOCK#; s#@STREAM@#127.0.0.1:$MOCK#; s#@HOLD@#127.0.0.1:$MOCK#; s#@ABORT@#127.0.0.1:$MOCK#" \
    -e "s#@THREADS@#2#; s#@WORK@#$W#g; s#@CONFIGS@#$PWD/load-tests/configs#; s#127.0.0.1:0#127.0.0.1:$GW#" \
    -e 's/models: \["mock-model"\]/models: ["mock-model-unused"]/; s/models: \["mock-stream"\]/models: ["mock-stream-unused"]/' \
    -e 's/models: \["mock-abort"\]/models: ["mock-abort-unused"]/' \
    load-tests/configs/infergate-all.yaml > "$W/gw.yaml"
RUST_LOG=warn "$B/infergate" --config "$W/gw.yaml" > "$W/gw.out" 2> "$W/gw.err" & GP=$!; pids+=($GP)
for _ in $(seq 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 0.5 -H "Authorization: Bearer $KEY" \
    "http://127.0.0.1:$GW/v1/models" || true)
  [ "$code" = 200 ] && break; sleep 0.1
done
[ "$code" = 200 ] || { echo "infergate did not start: $(tail -3 "$W/gw.err")" >&2; exit 1; }
perf probe -q -d 'probe_infergate:*' 2>/dev/null || true
for spec in '_rjem_malloc size=%di:u64' '_rjem_mallocx size=%di:u64' \
            '_rjem_sdallocx ptr=%di:u64 size=%si:u64' '_rjem_rallocx ptr=%di:u64 size=%si:u64'; do
  perf probe -q -x "$B/infergate" -a "$spec"
done
graph=(); [ $STACKS = 1 ] && graph=(--call-graph dwarf,16384)
perf record -e 'probe_infergate:*' "${graph[@]}" -p $GP -o "$W/perf.data" > "$W/perf.log" 2>&1 & PP=$!
sleep 1
mkfifo "$W/ctl"
"$B/loadgen" hold --url "http://127.0.0.1:$GW/v1/chat/completions" --header "Authorization: Bearer $KEY" \
  --body '{"model":"mock-hold","stream":true,"messages":[{"role":"user","content":"hi"}]}' \
  --streams "$N" < "$W/ctl" > "$W/hold.out" & LP=$!; pids+=($LP)
exec 3> "$W/ctl"
for _ in $(seq 300); do [ -s "$W/hold.out" ] && break; sleep 0.1; done
head -1 "$W/hold.out"
sleep 1
kill -INT $PP; wait $PP 2>/dev/null || true; [ -s "$W/perf.data" ] || { echo "perf recorded nothing: $(cat "$W/perf.log")" >&2; exit 1; }
echo close >&3; exec 3>&-
cat > "$W/net.py" <<'PY'
import collections, re, sys
n, stacks = int(sys.argv[1]), sys.argv[2] == "1"
net, count, where = collections.Counter(), collections.Counter(), collections.defaultdict(collections.Counter)
text = sys.stdin.read()
for rec in (text.split("\n\n") if stacks else text.splitlines()):
    m = re.search(r"probe_infergate:(\w+):.*?size=(\d+)", rec)
    if not m:
        continue
    ev, size = m.group(1), int(m.group(2))
    sign = -1 if ev == "_rjem_sdallocx" else 1
    net[size] += sign * size
    count[size] += sign
    if stacks and sign > 0:
        frames = [re.sub(r"::h[0-9a-f]{16}", "", l.strip().split(" ", 1)[-1]) for l in rec.strip().split("\n")[1:]]
        frames = [f for f in frames if not re.search(r"alloc::|__rust|_rjem|imalloc|RawVec|raw_vec|core::ptr", f)]
        where[size][" <- ".join(f[:90] for f in frames[:4])] += 1
print(f"net heap bytes per idle stream: {sum(net.values()) / n:,.0f} (N={n})")
print(f"{'bytes/stream':>12} {'count/stream':>12} {'size':>8}")
for size, v in sorted(net.items(), key=lambda kv: -kv[1])[:16]:
    print(f"{v / n:12,.0f} {count[size] / n:12.2f} {size:8d}")
    if stacks and where[size]:
        print("      " + where[size].most_common(1)[0][0])
PY
fields=event,trace; [ $STACKS = 1 ] && fields=event,trace,ip,sym
perf script -i "$W/perf.data" -F "$fields" 2>/dev/null | python3 "$W/net.py" "$N" "$STACKS"
