#!/usr/bin/env python3
"""ladder.py: infergate's performance ladder (issue #7), one command per scenario.

usage:
  load-tests/ladder.py [options] [SCENARIO ...]     (no scenario: all of them)
  load-tests/ladder.py --smoke                      the CI variant (a + c, ratio checks)
  load-tests/ladder.py check RESULT.json            the smoke checks on a result file
  load-tests/ladder.py report RESULT.json [--criterion]  rewrite goals and RESULT.md from the JSON
  load-tests/ladder.py compare BEFORE.json AFTER.json  every row of two runs side by side

scenarios:
  throughput   (a) max req/s, CPU/request at 1/8/64/256 connections: direct, passthrough
               (a minimal Pingora proxy), nginx, infergate with everything on, and with
               auth / limits / access log / all filters off in turn (wrk)
  latency      (b) added p50/p99 over direct at fixed request rates (loadgen, open loop)
  streaming    (c) added TTFT and per-chunk delay (mock send stamps, one clock), chunks
               coalesced, at 1 and 256 streams; client abort -> upstream close
  open-streams (d) RSS per held-open stream at 1,000 / 2,500 / 5,000 streams, RSS after
  body-size    (e) 1 KB .. 8 MB prompts, `model` first and last
  routing      (f) the Criterion micro-benchmark (benches/routing.rs)

options: --rounds N (5; smoke 3), --duration S (per run; scenario defaults), --threads N
(proxy worker threads, 2), --out BASE (results/<ts>), --keep (keep the work dir), --no-pin.
Writes BASE.json and BASE.md. Absolute numbers from a shared machine hold for nothing:
compare configurations within one run only.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ladder_report  # noqa: E402
import scenarios as sc  # noqa: E402
from lab import BIN, GATEWAY_VARIANTS, HERE, REPO, Lab, log  # noqa: E402

ALL = ["throughput", "latency", "streaming", "open-streams", "body-size", "routing"]


def sh(args):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30, cwd=REPO).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_state():
    lock = open(os.path.join(REPO, "Cargo.lock")).read()
    m = re.search(r'name = "pingora-core"\nversion = "([^"]+)"', lock)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), None)
    mem = next((ln.split()[1] for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), None)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return {
        "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)), "cpu_model": cpu,
        "mem_total_kib": int(mem) if mem else None, "kernel": platform.release(),
        "loadavg_start": os.getloadavg(), "uptime_start": sh(["uptime"]),
        "open_files_limit": sh(["bash", "-c", "ulimit -n"]),
        "git_rev": sh(["git", "rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(sh(["git", "status", "--porcelain", "--untracked-files=no"])),
        "versions": {"rustc": sh(["rustc", "--version"]), "pingora": m.group(1) if m else None,
                     "nginx": (subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
                               if os.path.exists(nginx) else None),
                     "wrk": (sh(["wrk", "-v"]) or "").splitlines()[0] if shutil.which("wrk") else None,
                     "python": platform.python_version()},
    }


def ensure_tools(need_nginx):
    missing = [p for p, ok in (("wrk", shutil.which("wrk")),
                               ("nginx-light", not need_nginx or shutil.which("nginx") or
                                os.path.exists("/usr/sbin/nginx"))) if not ok]
    if missing:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            log(f"installing {' '.join(missing)} (apt-get)")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=300)
            subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends"] + missing,
                           check=True, env=env, timeout=300)
        else:
            sys.exit(f"missing {' '.join(missing)}: apt-get install -y wrk nginx-light")
    for b in ("infergate", "mock-engine", "passthrough", "loadgen"):
        if not os.access(os.path.join(BIN, b), os.X_OK):
            sys.exit(f"no {b} in {BIN}: cargo build --release --bins")


def plan(args):
    """Per-scenario settings; the smoke variant is (a) + (c), short."""
    r = args.rounds or (3 if args.smoke else 5)
    if args.smoke:
        return {"rounds": r, "a_conns": [64], "a_dur": args.duration or 3, "c_levels": [1, 256],
                "c_dur": args.duration or 3, "aborts": 20,
                "a_targets": ["direct", "nginx", "infergate-all"],
                "c_targets": ["direct", "nginx", "infergate-all"]}
    return {"rounds": r, "a_conns": [1, 8, 64, 256], "a_dur": args.duration or 3,
            "a_targets": ["direct", "passthrough", "nginx"] + [f"infergate-{v}" for v in GATEWAY_VARIANTS],
            "b_points": [(1000, 1), (5000, 16), (10000, 32)], "b_dur": args.duration or 3,
            "c_levels": [1, 256], "c_dur": args.duration or 4, "aborts": 100,
            "c_targets": ["direct", "passthrough", "nginx", "infergate-all"],
            "d_levels": [1000, 2500, 5000], "d_rounds": min(r, 3),
            "d_targets": ["passthrough", "nginx", "infergate-all"],
            "e_sizes": [1024, 65536, 1 << 20, 8 << 20], "e_dur": args.duration or 1, "e_rounds": r,
            "e_targets": ["direct", "passthrough", "nginx", "infergate-all"]}


def run(args):
    wanted = ["throughput", "streaming"] if args.smoke else (args.scenarios or ALL)
    for s in wanted:
        if s not in ALL:
            sys.exit(f"unknown scenario {s}; one of {', '.join(ALL)}")
    p = plan(args)
    ts = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = args.out or os.path.join(HERE, "results", ("smoke-ladder-" if args.smoke else "ladder-") + ts)
    os.makedirs(os.path.dirname(base), exist_ok=True)
    needs_procs = [s for s in wanted if s != "routing"]
    ensure_tools(bool(needs_procs))
    res = {"meta": {"timestamp": ts, "smoke": args.smoke, "scenarios": wanted, "plan": p,
                    "machine": machine_state(), "proxy_threads": args.threads},
           "results": {}}
    log(f"load average at start: {res['meta']['machine']['loadavg_start']}")
    lab = Lab(threads=args.threads, pin=not args.no_pin, keep=args.keep)
    res["meta"]["pinning"] = lab.pinning

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if needs_procs:
            lab.start_upstreams()
            lab.start_nginx()
            res["meta"]["machine"]["versions"]["nginx_run"] = lab.nginx_version
            if not args.smoke:
                lab.start_passthrough()
            for v in (["all"] if args.smoke else GATEWAY_VARIANTS):
                lab.start_gateway(v)
        r = p["rounds"]
        if "throughput" in wanted:
            res["results"]["throughput"] = sc.throughput(lab, p["a_targets"], p["a_conns"], r, p["a_dur"])
        if "latency" in wanted:
            res["results"]["latency"] = sc.latency(lab, p["c_targets"], p["b_points"], r, p["b_dur"])
        if "streaming" in wanted:
            res["results"]["streaming"] = sc.streaming(lab, p["c_targets"], p["c_levels"], r, p["c_dur"],
                                                       p["aborts"])
        if "open-streams" in wanted:
            res["results"]["open_streams"] = sc.open_streams(lab, p["d_targets"], p["d_levels"], p["d_rounds"])
        if "body-size" in wanted:
            res["results"]["body_size"] = sc.body_size(lab, p["e_targets"], p["e_sizes"], p["e_rounds"],
                                                       p["e_dur"])
    finally:
        lab.stop_all()
    if "routing" in wanted:
        res["results"]["routing"] = sc.routing(quick=False)
    res["meta"]["machine"]["loadavg_end"] = os.getloadavg()
    res["meta"]["machine"]["uptime_end"] = sh(["uptime"])
    res["goals"] = ladder_report.goals(res)
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    md = ladder_report.markdown(res)
    with open(base + ".md", "w") as f:
        f.write(md)
    print(md)
    log(f"results: {base}.json, {base}.md")
    return base + ".json"


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "report":
        # re-derive goals and the Markdown from a result file (after a report change)
        with open(sys.argv[2]) as fh:
            res = json.load(fh)
        if "--criterion" in sys.argv:  # take (f) from target/criterion (the last cargo bench)
            res["results"]["routing"] = {"benches": sc.criterion_results()}
        res["goals"] = ladder_report.goals(res)
        with open(sys.argv[2], "w") as fh:
            json.dump(res, fh, indent=1)
            fh.write("\n")
        md = ladder_report.markdown(res)
        with open(sys.argv[2][:-len(".json")] + ".md", "w") as fh:
            fh.write(md)
        print(md)
        return 0
    if len(sys.argv) >= 4 and sys.argv[1] == "compare":
        # every row of two runs side by side (Markdown on stdout)
        with open(sys.argv[2]) as fb, open(sys.argv[3]) as fa:
            print(ladder_report.compare(json.load(fb), json.load(fa)))
        return 0
    if len(sys.argv) >= 3 and sys.argv[1] == "check":
        ap = argparse.ArgumentParser(prog="ladder.py check")
        ap.add_argument("result")
        ap.add_argument("--min-over-nginx", type=float, default=float(os.environ.get("SMOKE_MIN_OVER_NGINX", 0.25)))
        ap.add_argument("--min-over-direct", type=float,
                        default=float(os.environ.get("SMOKE_MIN_OVER_DIRECT", 0.15)))
        a = ap.parse_args(sys.argv[2:])
        return ladder_report.check(a.result, a.min_over_nginx, a.min_over_direct)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--duration", type=float)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-pin", action="store_true")
    args = ap.parse_args()
    started = time.time()
    out = run(args)
    log(f"done in {time.time() - started:.0f} s")
    if args.smoke:
        return ladder_report.check(out, float(os.environ.get("SMOKE_MIN_OVER_NGINX", 0.25)),
                                   float(os.environ.get("SMOKE_MIN_OVER_DIRECT", 0.15)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
