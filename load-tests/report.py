#!/usr/bin/env python3
"""Summarise and check load-tests/bench.sh results (stdlib only).

  report.py summarize RUNS.jsonl META.json OUT.json   -> writes OUT.json, prints markdown
  report.py check OUT.json [--min-gateway-ratio 0.15] [--min-gateway-over-nginx 0.4] [--min-auth-ratio 0.4]
      -> exit 1 (with reasons) on failure

RUNS.jsonl has one line per wrk run:
  {"target": "direct|nginx|gateway", "mode": "load|c1", "round": N,
   "wrk": {...chat.lua's BENCHJSON...}, "proxy_cpu_s": F|null, "mock_cpu_s": F}
Each metric is the median over rounds of that target's per-round value; ratios and
added latencies are computed from those medians.
"""
import json
import statistics
import sys

TARGETS = ["direct", "nginx", "gateway", "gateway-auth"]
LABEL = {"direct": "direct → mock", "nginx": "nginx → mock", "gateway": "infergate → mock",
         "gateway-auth": "infergate + auth + limits → mock"}


def per_run(r):
    w = r["wrk"]
    secs = w["duration_us"] / 1e6
    n = w["requests"]
    e = w["errors"]
    d = {
        "rps": n / secs if secs else 0.0,
        "p50_us": w["latency_us"]["p50"],
        "p90_us": w["latency_us"]["p90"],
        "p99_us": w["latency_us"]["p99"],
        "p999_us": w["latency_us"]["p999"],
        "mean_us": w["latency_us"]["mean"],
        "requests": n,
        "non2xx": e["status"],
        "socket_errors": e["connect"] + e["read"] + e["write"] + e["timeout"],
        "proxy_cpu_us_per_req": (r["proxy_cpu_s"] * 1e6 / n) if (n and r.get("proxy_cpu_s") is not None) else None,
        "mock_cpu_us_per_req": (r["mock_cpu_s"] * 1e6 / n) if (n and r.get("mock_cpu_s") is not None) else None,
    }
    return d


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runs_path, meta_path, out_path):
    runs = [json.loads(l) for l in open(runs_path) if l.strip()]
    meta = json.load(open(meta_path))
    res = {"meta": meta, "runs": runs, "summary": {}, "ratios": {}}
    for mode in ("load", "c1"):
        res["summary"][mode] = {}
        for t in TARGETS:
            rs = [per_run(r) for r in runs if r["target"] == t and r["mode"] == mode]
            if not rs:
                continue
            s = {k: med([r[k] for r in rs]) for k in
                 ("rps", "p50_us", "p90_us", "p99_us", "p999_us", "mean_us",
                  "proxy_cpu_us_per_req", "mock_cpu_us_per_req")}
            s["rounds"] = len(rs)
            s["requests_total"] = sum(r["requests"] for r in rs)
            s["non2xx_total"] = sum(r["non2xx"] for r in rs)
            s["socket_errors_total"] = sum(r["socket_errors"] for r in rs)
            s["rps_per_round"] = [round(r["rps"], 1) for r in rs]
            res["summary"][mode][t] = s

    def ratio(mode, a, b, k="rps"):
        sa, sb = res["summary"][mode].get(a), res["summary"][mode].get(b)
        if not sa or not sb or not sb[k]:
            return None
        return sa[k] / sb[k]

    def diff(mode, a, b, k):
        sa, sb = res["summary"][mode].get(a), res["summary"][mode].get(b)
        if not sa or not sb or sa[k] is None or sb[k] is None:
            return None
        return sa[k] - sb[k]

    r = res["ratios"]
    for mode in ("load", "c1"):
        r[mode] = {
            "gateway_over_direct_rps": ratio(mode, "gateway", "direct"),
            "nginx_over_direct_rps": ratio(mode, "nginx", "direct"),
            "gateway_over_nginx_rps": ratio(mode, "gateway", "nginx"),
            "gateway_added_p50_us": diff(mode, "gateway", "direct", "p50_us"),
            "gateway_added_p99_us": diff(mode, "gateway", "direct", "p99_us"),
            "nginx_added_p50_us": diff(mode, "nginx", "direct", "p50_us"),
            "nginx_added_p99_us": diff(mode, "nginx", "direct", "p99_us"),
            "auth_over_plain_rps": ratio(mode, "gateway-auth", "gateway"),
            "auth_added_p50_us": diff(mode, "gateway-auth", "gateway", "p50_us"),
            "auth_added_p99_us": diff(mode, "gateway-auth", "gateway", "p99_us"),
            "auth_added_cpu_us_per_req": diff(mode, "gateway-auth", "gateway", "proxy_cpu_us_per_req"),
        }
    with open(out_path, "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    print(markdown(res))


def fmt(x, nd=0, sign=False):
    if x is None:
        return "–"
    s = f"{x:+,.{nd}f}" if sign else f"{x:,.{nd}f}"
    return s


def markdown(res):
    m = res["meta"]
    out = []
    out.append(f"## infergate benchmark {m['timestamp']}")
    out.append("")
    out.append(f"- {m['rounds']} round(s) × {m['duration']} per target, {m['connections']} connections "
               f"(wrk -t{m['wrk_threads']}), 1-connection runs {m['lat_duration']}; "
               f"median of rounds; targets alternated each round")
    out.append(f"- load at start: `{m['uptime_start'].strip()}`")
    out.append(f"- load at end:   `{m.get('uptime_end', '').strip()}`")
    out.append(f"- pinning: {m['pinning']}; proxies: {m['proxy_threads']} worker threads each; "
               f"{m['nproc']} CPUs")
    out.append("")
    for mode, title in (("load", f"### Throughput, {m['connections']} connections"),
                        ("c1", "### Latency at low load, 1 connection (wrk -c1 -t1)")):
        s = res["summary"].get(mode, {})
        if not s:
            continue
        out.append(title)
        out.append("")
        out.append("| target | req/s | p50 µs | p99 µs | p99.9 µs | non-2xx | socket errors "
                   "| proxy CPU µs/req | mock CPU µs/req | req/s per round |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for t in TARGETS:
            if t not in s:
                continue
            x = s[t]
            out.append(f"| {LABEL[t]} | {fmt(x['rps'])} | {fmt(x['p50_us'])} | {fmt(x['p99_us'])} "
                       f"| {fmt(x['p999_us'])} | {x['non2xx_total']} | {x['socket_errors_total']} "
                       f"| {fmt(x['proxy_cpu_us_per_req'], 1)} | {fmt(x['mock_cpu_us_per_req'], 1)} "
                       f"| {', '.join(fmt(v) for v in x['rps_per_round'])} |")
        out.append("")
    out.append("### Ratios and added latency (from the medians)")
    out.append("")
    out.append(f"| measure | {m['connections']} connections | 1 connection |")
    out.append("|---|---:|---:|")
    rl, rc = res["ratios"].get("load", {}), res["ratios"].get("c1", {})
    for k, lab, nd, sign in (
            ("gateway_over_direct_rps", "throughput infergate / direct", 3, False),
            ("nginx_over_direct_rps", "throughput nginx / direct", 3, False),
            ("gateway_over_nginx_rps", "throughput infergate / nginx", 3, False),
            ("gateway_added_p50_us", "added p50 µs, infergate − direct", 0, True),
            ("gateway_added_p99_us", "added p99 µs, infergate − direct", 0, True),
            ("nginx_added_p50_us", "added p50 µs, nginx − direct", 0, True),
            ("nginx_added_p99_us", "added p99 µs, nginx − direct", 0, True),
            ("auth_over_plain_rps", "throughput with auth + limits / without", 3, False),
            ("auth_added_p50_us", "added p50 µs, auth + limits on − off", 0, True),
            ("auth_added_p99_us", "added p99 µs, auth + limits on − off", 0, True),
            ("auth_added_cpu_us_per_req", "added proxy CPU µs/req, auth + limits on − off", 1, True)):
        out.append(f"| {lab} | {fmt(rl.get(k), nd, sign)} | {fmt(rc.get(k), nd, sign)} |")
    out.append("")
    return "\n".join(out)


def check(out_path, min_ratio, min_nginx_ratio, min_auth_ratio):
    res = json.load(open(out_path))
    why = []
    targets = res["meta"].get("targets") or TARGETS
    for mode in ("load", "c1"):
        for t in targets:
            s = res["summary"].get(mode, {}).get(t)
            if s is None:
                why.append(f"{mode}: no result for target {t}")
                continue
            if s["requests_total"] == 0:
                why.append(f"{mode}/{t}: no request completed")
            if s["non2xx_total"]:
                why.append(f"{mode}/{t}: {s['non2xx_total']} non-2xx responses")
            if s["socket_errors_total"]:
                why.append(f"{mode}/{t}: {s['socket_errors_total']} socket errors (connect/read/write/timeout)")
    g = res["ratios"].get("load", {}).get("gateway_over_direct_rps")
    if g is None:
        why.append("no gateway/direct throughput ratio")
    elif g < min_ratio:
        why.append(f"gateway throughput is {g:.3f} × direct, below the floor {min_ratio}")
    n = res["ratios"].get("load", {}).get("gateway_over_nginx_rps")
    if n is None:
        why.append("no gateway/nginx throughput ratio")
    elif n < min_nginx_ratio:
        why.append(f"gateway throughput is {n:.3f} × nginx, below the floor {min_nginx_ratio}")
    a = res["ratios"].get("load", {}).get("auth_over_plain_rps")
    if "gateway-auth" in targets:
        if a is None:
            why.append("no (auth + limits)/plain throughput ratio")
        elif a < min_auth_ratio:
            why.append(f"throughput with auth + limits is {a:.3f} × without, below the floor {min_auth_ratio}")
    if why:
        print("SMOKE FAILED:")
        for w in why:
            print("  - " + w)
        return 1
    auth = f"; auth + limits/plain {a:.3f} (floor {min_auth_ratio})" if a is not None else ""
    print(f"smoke ok: gateway/direct throughput {g:.3f} (floor {min_ratio}), "
          f"gateway/nginx {n:.3f} (floor {min_nginx_ratio}){auth}; "
          f"0 non-2xx and 0 socket errors on every target")
    return 0


def main(argv):
    if len(argv) >= 5 and argv[1] == "summarize":
        summarize(argv[2], argv[3], argv[4])
        return 0
    if len(argv) >= 3 and argv[1] == "check":
        floor, nginx_floor, auth_floor = 0.15, 0.4, 0.4
        if "--min-gateway-ratio" in argv:
            floor = float(argv[argv.index("--min-gateway-ratio") + 1])
        if "--min-gateway-over-nginx" in argv:
            nginx_floor = float(argv[argv.index("--min-gateway-over-nginx") + 1])
        if "--min-auth-ratio" in argv:
            auth_floor = float(argv[argv.index("--min-auth-ratio") + 1])
        return check(argv[2], floor, nginx_floor, auth_floor)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
