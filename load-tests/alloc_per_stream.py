#!/usr/bin/env python3
"""alloc_per_stream.py [N] [--stacks] [--keep]: heap bytes an idle stream holds in infergate, by size.

Starts the ladder's mocks and infergate with everything on (lab.py, configs/infergate-all.yaml),
puts uprobes on jemalloc's allocation entry points in target/release/infergate (_rjem_malloc,
_rjem_mallocx, _rjem_rallocx: + size; _rjem_sdallocx: - size, Rust frees with a size), records
them while `loadgen hold` opens N streams (default 200) to the mock that sends one token and
waits, and prints the net bytes per stream by allocation size. `--stacks` also prints the call
site of each of the largest sizes (perf --call-graph dwarf: slow, and perf then loses events, so
its totals are low: the figures come from a run without it). Needs root,
perf with uprobe support and the release binaries (cargo build --release --bins). A diagnostic,
not a test: it is what docs/performance.md's memory table comes from.
"""
import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lab import AUTH_HEADER, BIN, UPSTREAMS, Lab, log  # noqa: E402

PROBES = ["_rjem_malloc size=%di:u64", "_rjem_mallocx size=%di:u64",
          "_rjem_sdallocx ptr=%di:u64 size=%si:u64", "_rjem_rallocx ptr=%di:u64 size=%si:u64"]


def perf(*args, check=True):
    return subprocess.run(["perf", *args], capture_output=True, text=True, timeout=600, check=check)


def analyse(text, n, stacks):
    net, count, where = collections.Counter(), collections.Counter(), collections.defaultdict(collections.Counter)
    for rec in (text.split("\n\n") if stacks else text.splitlines()):
        m = re.search(r"probe_infergate:(\w+):.*?size=(\d+)", rec)
        if not m:
            continue
        size = int(m.group(2))
        sign = -1 if m.group(1) == "_rjem_sdallocx" else 1
        net[size] += sign * size
        count[size] += sign
        if stacks and sign > 0:
            frames = [re.sub(r"::h[0-9a-f]{16}", "", ln.strip().split(" ", 1)[-1]) for ln in rec.strip().split("\n")[1:]]
            frames = [f for f in frames if not re.search(r"alloc::|__rust|_rjem|imalloc|RawVec|raw_vec|core::ptr", f)]
            where[size][" <- ".join(f[:90] for f in frames[:4])] += 1
    if stacks:
        print("--stacks: perf loses events while it unwinds with dwarf, so these totals are low;"
              " run without --stacks for the figures, use this for the call sites")
    print(f"net heap bytes per idle stream: {sum(net.values()) / n:,.0f} (N={n})")
    print(f"{'bytes/stream':>12} {'count/stream':>12} {'size':>8}")
    for size, v in sorted(net.items(), key=lambda kv: -kv[1])[:16]:
        print(f"{v / n:12,.0f} {count[size] / n:12.2f} {size:8d}")
        if stacks and where[size]:
            print("      " + where[size].most_common(1)[0][0])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("streams", type=int, nargs="?", default=200)
    ap.add_argument("--stacks", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    exe = os.path.join(BIN, "infergate")
    lab = Lab(threads=2, pin=False, keep=args.keep)
    perf("probe", "-q", "-d", "probe_infergate:*", check=False)
    try:
        lab.start_upstreams()
        lab.start_gateway("all")
        gw = lab.targets["infergate-all"]
        for spec in PROBES:
            perf("probe", "-q", "-x", exe, "-a", spec)
        data = os.path.join(lab.work, "perf.data")
        graph = ["--call-graph", "dwarf,16384"] if args.stacks else []
        # start disabled, enable over perf's control fifo and wait for its ack: the streams are
        # opened only once the probes are being recorded
        ctl, ack = os.path.join(lab.work, "perf.ctl"), os.path.join(lab.work, "perf.ack")
        os.mkfifo(ctl)
        os.mkfifo(ack)
        rec = subprocess.Popen(["perf", "record", "-q", "-D", "-1", "--control", f"fifo:{ctl},{ack}",
                                "-e", "probe_infergate:*", *graph, "-p", str(gw.pids[0]), "-o", data],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        signal.alarm(30)  # the fifo handshake is bounded: perf that does not start ends the run
        with open(ctl, "w") as c, open(ack) as a:
            c.write("enable\n")
            c.flush()
            a.readline()
        signal.alarm(0)
        body = json.dumps({"model": UPSTREAMS["hold"], "stream": True,
                           "messages": [{"role": "user", "content": "hi"}]})
        hold = subprocess.Popen([os.path.join(BIN, "loadgen"), "hold", "--url", gw.url("hold"), "--header",
                                 AUTH_HEADER, "--body", body, "--streams", str(args.streams)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = json.loads(hold.stdout.readline() or "{}")
        log(f"{ready.get('open', 0)} streams open, {ready.get('failed')} failed")
        rec.send_signal(signal.SIGINT)
        rec.wait(60)
        hold.stdin.write("close\n")
        hold.stdin.flush()
        hold.wait(60)
        fields = "event,trace,ip,sym" if args.stacks else "event,trace"
        out = perf("script", "-i", data, "-F", fields).stdout
        analyse(out, max(ready.get("open", 0), 1), args.stacks)
    finally:
        perf("probe", "-q", "-d", "probe_infergate:*", check=False)
        lab.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
