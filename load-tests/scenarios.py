"""The ladder's scenarios (issue #7 a-f). Each takes a started `Lab` and
returns its raw rounds plus per-configuration medians; `report.py`-style
formatting lives in ladder_report.py.

Method shared by all: the configurations of one scenario alternate within
each round (the order rotates every round, so drift in the machine's load
spreads evenly), and every figure is the median over rounds. "Added" values
are paired: target minus direct within the same round, then the median.
"""
import json
import os
import statistics
import subprocess
import time

from lab import AUTH_HEADER, BIN, HERE, REPO, UPSTREAMS, cpu_seconds, log, rss_kib


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def dur(seconds):
    """loadgen's duration syntax (humantime takes no fractions)."""
    return f"{int(seconds * 1000)}ms"


def rotated(items, r):
    k = r % len(items)
    return items[k:] + items[:k]


def loadgen(lab, args, timeout):
    p = subprocess.run(lab.client_pin + [os.path.join(BIN, "loadgen")] + args,
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"loadgen {' '.join(args[:3])} failed: {p.stderr.strip()[-500:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ (a) throughput
def wrk(lab, target, conns, duration, body):
    t = lab.targets[target]
    env = dict(os.environ, BENCH_BODY=body, BENCH_KEY=AUTH_HEADER.split()[-1])
    pids = lab.target_pids(target)
    p0, m0 = cpu_seconds(pids), cpu_seconds(lab.mock_pids)
    out = subprocess.run(lab.client_pin + ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--timeout", "5s",
                                            "--latency", "-s", os.path.join(HERE, "chat.lua"), t.url("chat")],
                         capture_output=True, text=True, env=env, timeout=int(duration) + 60)
    p1, m1 = cpu_seconds(pids), cpu_seconds(lab.mock_pids)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"no summary from wrk against {target}: {out.stdout[-300:]} {out.stderr[-300:]}")
    w = json.loads(line[len("BENCHJSON "):])
    n = max(w["requests"], 1)
    e = w["errors"]
    return {"rps": w["requests"] / (w["duration_us"] / 1e6), "p50_us": w["latency_us"]["p50"],
            "p99_us": w["latency_us"]["p99"], "requests": w["requests"],
            "proxy_cpu_us_per_req": (p1 - p0) * 1e6 / n if pids else None,
            "mock_cpu_us_per_req": (m1 - m0) * 1e6 / n,
            "non2xx": e["status"], "socket_errors": e["connect"] + e["read"] + e["write"] + e["timeout"]}


def throughput(lab, targets, conns_list, rounds, duration):
    body = json.dumps({"model": UPSTREAMS["chat"], "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 8}, separators=(",", ":"))
    raw = []
    for t in targets:  # warm-up: fills connection pools, JIT-free but caches and allocators
        wrk(lab, t, 64, 1, body)
    for conns in conns_list:
        for r in range(rounds):
            for t in rotated(targets, r):
                x = wrk(lab, t, conns, duration, body)
                x.update(target=t, connections=conns, round=r)
                raw.append(x)
                log(f"(a) c={conns:<3} round {r} {t:<24} {x['rps']:>9.0f} req/s  p99 {x['p99_us']:>6} us  "
                    f"proxy {x['proxy_cpu_us_per_req'] or 0:5.1f} us/req")
    summary = {}
    for conns in conns_list:
        for t in targets:
            rs = [x for x in raw if x["target"] == t and x["connections"] == conns]
            direct = {x["round"]: x for x in raw if x["target"] == "direct" and x["connections"] == conns}
            summary.setdefault(str(conns), {})[t] = {
                "rps": med([x["rps"] for x in rs]),
                "p50_us": med([x["p50_us"] for x in rs]),
                "p99_us": med([x["p99_us"] for x in rs]),
                "added_p50_us": med([x["p50_us"] - direct[x["round"]]["p50_us"] for x in rs if x["round"] in direct]),
                "added_p99_us": med([x["p99_us"] - direct[x["round"]]["p99_us"] for x in rs if x["round"] in direct]),
                "proxy_cpu_us_per_req": med([x["proxy_cpu_us_per_req"] for x in rs]),
                "mock_cpu_us_per_req": med([x["mock_cpu_us_per_req"] for x in rs]),
                "non2xx": sum(x["non2xx"] for x in rs), "socket_errors": sum(x["socket_errors"] for x in rs),
                "rps_rounds": [round(x["rps"]) for x in rs]}
    return {"raw": raw, "summary": summary, "rounds": rounds, "duration_s": duration}


# ------------------------------------------------------------------ (b) fixed-rate latency
def latency(lab, targets, points, rounds, duration):
    raw = []
    for r in range(rounds):
        for rate, conns in points:
            for t in rotated(targets, r):
                x = loadgen(lab, ["load", "--url", lab.targets[t].url("chat"), "--header", AUTH_HEADER,
                                  "--rate", str(rate), "--connections", str(conns),
                                  "--duration", dur(duration), "--warmup", "1s"], int(duration) + 60)
                raw.append({"target": t, "rate": rate, "connections": conns, "round": r, "result": x})
                log(f"(b) {rate:>6}/s c={conns:<3} round {r} {t:<24} p50 {x['latency_us']['p50']:>5} us "
                    f"p99 {x['latency_us']['p99']:>6} us  achieved {x['achieved_rate']:.0f}/s errors {x['errors']}")
    summary = {}
    for rate, conns in points:
        key = f"{rate}/s c{conns}"
        for t in targets:
            rs = [x for x in raw if x["target"] == t and x["rate"] == rate]
            d = {x["round"]: x["result"] for x in raw if x["target"] == "direct" and x["rate"] == rate}
            lat = lambda x, p: x["result"]["latency_us"][p]  # noqa: E731
            summary.setdefault(key, {})[t] = {
                "p50_us": med([lat(x, "p50") for x in rs]), "p99_us": med([lat(x, "p99") for x in rs]),
                "added_p50_us": med([lat(x, "p50") - d[x["round"]]["latency_us"]["p50"] for x in rs]),
                "added_p99_us": med([lat(x, "p99") - d[x["round"]]["latency_us"]["p99"] for x in rs]),
                "achieved_rate": med([x["result"]["achieved_rate"] for x in rs]),
                "errors": sum(x["result"]["errors"] + x["result"]["non2xx"] for x in rs)}
    return {"raw": raw, "summary": summary, "rounds": rounds, "duration_s": duration}


# ------------------------------------------------------------------ (c) streaming
def stream_shape(streams):
    """(µs between tokens, tokens per response): one stream gets many short
    responses (TTFT samples); many streams a realistic 50 tokens/s each, which
    keeps 256 streams (12,800 chunks/s) within what 2 shared cores carry."""
    return (10000, 8) if streams <= 8 else (20000, 16)


def streaming(lab, targets, levels, rounds, duration, aborts):
    raw = []
    for r in range(rounds):
        for streams in levels:
            for t in rotated(targets, r):
                interval_us, tokens = stream_shape(streams)
                x = loadgen(lab, ["stream", "--url", lab.targets[t].url("stream"), "--header", AUTH_HEADER,
                                  "--header", f"x-mock-token-interval-us: {interval_us}",
                                  "--body", json.dumps({"model": UPSTREAMS["stream"], "stream": True,
                                                        "max_tokens": tokens,
                                                        "messages": [{"role": "user", "content": "hi"}]}),
                                  "--streams", str(streams), "--duration", dur(duration), "--warmup", "1s"],
                            int(duration) + 60)
                raw.append({"target": t, "streams": streams, "round": r, "result": x})
                log(f"(c) streams={streams:<4} round {r} {t:<24} ttft p50 {x['ttft_us']['p50']} p99 "
                    f"{x['ttft_us']['p99']} us; chunk p50 {x['chunk_delay_us']['p50']} p99 "
                    f"{x['chunk_delay_us']['p99']} us; coalesced {x['coalesced']}; errors {x['errors']}")
    summary = {}
    for streams in levels:
        for t in targets:
            rs = [x for x in raw if x["target"] == t and x["streams"] == streams]
            d = {x["round"]: x["result"] for x in raw if x["target"] == "direct" and x["streams"] == streams}
            g = lambda x, k, p: x["result"][k][p]  # noqa: E731
            summary.setdefault(str(streams), {})[t] = {
                "ttft_p50_us": med([g(x, "ttft_us", "p50") for x in rs]),
                "ttft_p99_us": med([g(x, "ttft_us", "p99") for x in rs]),
                "chunk_p50_us": med([g(x, "chunk_delay_us", "p50") for x in rs]),
                "chunk_p99_us": med([g(x, "chunk_delay_us", "p99") for x in rs]),
                "added_ttft_p50_us": med([g(x, "ttft_us", "p50") - d[x["round"]]["ttft_us"]["p50"] for x in rs]),
                "added_ttft_p99_us": med([g(x, "ttft_us", "p99") - d[x["round"]]["ttft_us"]["p99"] for x in rs]),
                "added_chunk_p50_us": med([g(x, "chunk_delay_us", "p50") - d[x["round"]]["chunk_delay_us"]["p50"]
                                           for x in rs]),
                "added_chunk_p99_us": med([g(x, "chunk_delay_us", "p99") - d[x["round"]]["chunk_delay_us"]["p99"]
                                           for x in rs]),
                "chunks": sum(x["result"]["chunks"] for x in rs),
                "coalesced": sum(x["result"]["coalesced"] for x in rs),
                "errors": sum(x["result"]["errors"] for x in rs)}
    abort = {}
    if aborts:
        for t in targets:
            x = loadgen(lab, ["abort", "--listen", lab.upstream["abort"], "--url", lab.targets[t].url("abort"),
                              "--header", AUTH_HEADER, "--count", str(aborts),
                              "--body", json.dumps({"model": UPSTREAMS["abort"], "stream": True,
                                                    "messages": [{"role": "user", "content": "hi"}]})], 120)
            abort[t] = x
            s = x["abort_to_upstream_close_us"]
            log(f"(c) abort {t:<24} abort -> upstream close p50 {s['p50']} us p99 {s['p99']} us max {s['max']} us; "
                f"not closed {x['not_closed_within_5s']}")
    return {"raw": raw, "summary": summary, "abort": abort, "rounds": rounds, "duration_s": duration,
            "shapes": {str(n): {"token_interval_us": stream_shape(n)[0], "tokens": stream_shape(n)[1]}
                       for n in levels}, "levels": levels}


# ------------------------------------------------------------------ (d) open streams
# how long (d) waits, after the streams close, for RSS to come back near base
SETTLE_S = 15.0


def open_streams(lab, targets, levels, rounds):
    body = json.dumps({"model": UPSTREAMS["hold"], "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]})
    raw = []
    for r in range(rounds):
        for n in levels:
            for t in rotated(targets, r):
                pids = lab.target_pids(t, "hold")
                time.sleep(1.0)
                base = rss_kib(pids)
                p = subprocess.Popen(lab.client_pin + [os.path.join(BIN, "loadgen"), "hold", "--url",
                                                       lab.targets[t].url("hold"), "--header", AUTH_HEADER,
                                                       "--body", body, "--streams", str(n)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                ready = json.loads(p.stdout.readline() or "{}")
                time.sleep(1.0)
                loaded = rss_kib(pids)
                p.stdin.write("close\n")
                p.stdin.flush()
                p.stdout.readline()
                p.wait(60)
                closed = time.monotonic()
                time.sleep(2.0)
                after = rss_kib(pids)
                # then wait (up to SETTLE_S) for the process to give memory
                # back: an allocator may purge freed pages on a timer
                settled, settle_s = after, None
                while True:
                    if settled - base <= max(1024, 0.1 * (loaded - base)):
                        settle_s = time.monotonic() - closed
                        break
                    if time.monotonic() - closed >= SETTLE_S:
                        break
                    time.sleep(0.5)
                    settled = rss_kib(pids)
                x = {"target": t, "streams": n, "round": r, "open": ready.get("open", 0),
                     "failed": ready.get("failed"), "open_seconds": ready.get("seconds"),
                     "rss_base_kib": base, "rss_loaded_kib": loaded, "rss_after_kib": after,
                     "rss_settled_kib": settled, "settle_seconds": settle_s,
                     "kib_per_stream": (loaded - base) / max(ready.get("open", 0), 1),
                     "after_minus_base_kib": after - base, "settled_minus_base_kib": settled - base}
                raw.append(x)
                back = f"back near base in {settle_s:.1f}s" if settle_s is not None else f"not back after {SETTLE_S}s"
                log(f"(d) {n:>5} streams round {r} {t:<24} open {x['open']} in {x['open_seconds']:.1f}s; "
                    f"RSS {base} -> {loaded} -> {after} (2s) -> {settled} KiB ({back}): "
                    f"{x['kib_per_stream']:.1f} KiB/stream")
    summary = {}
    for n in levels:
        for t in targets:
            rs = [x for x in raw if x["target"] == t and x["streams"] == n]
            summary.setdefault(str(n), {})[t] = {
                "kib_per_stream": med([x["kib_per_stream"] for x in rs]),
                "rss_base_kib": med([x["rss_base_kib"] for x in rs]),
                "rss_loaded_kib": med([x["rss_loaded_kib"] for x in rs]),
                "after_minus_base_kib": med([x["after_minus_base_kib"] for x in rs]),
                "settled_minus_base_kib": med([x["settled_minus_base_kib"] for x in rs]),
                "settled_rounds": sum(1 for x in rs if x["settle_seconds"] is not None),
                "settle_seconds_max": max((x["settle_seconds"] for x in rs if x["settle_seconds"] is not None),
                                          default=None),
                "open_min": min(x["open"] for x in rs), "failed": sum(x["failed"] or 0 for x in rs)}
    return {"raw": raw, "summary": summary, "rounds": rounds, "levels": levels}


# ------------------------------------------------------------------ (e) request size
def body_of(size, model_last):
    model = UPSTREAMS["chat"]
    skeleton = {"messages": [{"role": "user", "content": ""}], "max_tokens": 8}
    base = len(json.dumps({"model": model, **skeleton}, separators=(",", ":")))
    skeleton["messages"][0]["content"] = "a" * max(0, size - base)
    d = {**skeleton, "model": model} if model_last else {"model": model, **skeleton}
    return json.dumps(d, separators=(",", ":"))


def body_size(lab, targets, sizes, rounds, duration):
    files = {}
    for size in sizes:
        for last in (False, True):
            path = os.path.join(lab.work, f"body-{size}-{'last' if last else 'first'}.json")
            with open(path, "w") as f:
                f.write(body_of(size, last))
            files[(size, last)] = path
    raw = []
    for r in range(rounds):
        for (size, last), path in files.items():
            for t in rotated(targets, r):
                x = loadgen(lab, ["load", "--url", lab.targets[t].url("chat"), "--header", AUTH_HEADER,
                                  "--body-file", path, "--connections", "1", "--duration", dur(duration),
                                  "--warmup", "500ms"], int(duration) + 60)
                raw.append({"target": t, "size": size, "model": "last" if last else "first", "round": r,
                            "result": x})
        log(f"(e) round {r} done")
    summary = {}
    for (size, last) in files:
        key = f"{size} {'last' if last else 'first'}"
        for t in targets:
            m = "last" if last else "first"
            rs = [x for x in raw if x["target"] == t and x["size"] == size and x["model"] == m]
            d = {x["round"]: x["result"] for x in raw if x["target"] == "direct" and x["size"] == size
                 and x["model"] == m}
            summary.setdefault(key, {})[t] = {
                "p50_us": med([x["result"]["latency_us"]["p50"] for x in rs]),
                "p99_us": med([x["result"]["latency_us"]["p99"] for x in rs]),
                "added_p50_us": med([x["result"]["latency_us"]["p50"] - d[x["round"]]["latency_us"]["p50"]
                                     for x in rs]),
                "added_p99_us": med([x["result"]["latency_us"]["p99"] - d[x["round"]]["latency_us"]["p99"]
                                     for x in rs]),
                "errors": sum(x["result"]["errors"] + x["result"]["non2xx"] for x in rs)}
    return {"raw": raw, "summary": summary, "rounds": rounds, "duration_s": duration, "sizes": sizes}


# ------------------------------------------------------------------ (f) routing (Criterion)
def routing(quick):
    args = ["cargo", "bench", "--bench", "routing", "--", "--noplot"]
    if quick:
        args += ["--warm-up-time", "0.5", "--measurement-time", "1"]
    log("(f) " + " ".join(args))
    p = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"cargo bench failed: {p.stderr[-800:]}")
    return {"benches": criterion_results()}


def criterion_results():
    """Median and mean of every Criterion benchmark under target/criterion."""
    root = os.path.join(REPO, "target", "criterion")
    out = {}
    for d, _dirs, files in sorted(os.walk(root)):
        if os.path.basename(d) == "new" and "estimates.json" in files:
            with open(os.path.join(d, "estimates.json")) as f:
                e = json.load(f)
            out[os.path.relpath(os.path.dirname(d), root)] = {"median_ns": e["median"]["point_estimate"],
                                                               "mean_ns": e["mean"]["point_estimate"]}
    return out
