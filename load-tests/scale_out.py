#!/usr/bin/env python3
"""Scale-out benchmark (issue #16): replicas sharing limits through Redis.

usage: python3 load-tests/scale_out.py [--quick] [--rounds N] [--out BASE] [--check]

Starts a real redis-server (Debian's; on a free port, no persistence) and mock engines, then:

  exactness  3 gateway replicas, clients spread round-robin over them, `store: memory` and
             `store: redis` in turn (fresh replicas and a flushed Redis each):
             - rate: a key with requests_per_second 50 (burst 50), 12 client threads for 6 s
               (quick: 3 s); aggregate admitted requests per second after the first second
               (the burst). Goal with redis: 50 +- 10 %.
             - concurrency: a key with concurrent 4, an engine answering after 300 ms, 12 client
               threads; the engine's max_active (/mock/stats). Goal with redis: <= 4.
             - quota: a key with quota 3,000 tokens, 12 threads until every request is refused;
               the tokens charged to the key (/admin/usage: Redis' shared total, or the sum over the
               replicas' own) vs 3,000.
               Goal with redis: over by at most the reservations in flight (12 requests).
  cost       one gateway, everything on (load-tests/configs/infergate-all.yaml: auth, limits at
             three levels, access log), `store: memory` vs `store: redis`, alternating, --rounds
             rounds (3; quick 1) x 5 s (quick 2 s) each of wrk -t1 -c1 (latency) and -c64
             (throughput), a mock without delays; gateway CPU per request (/proc), Redis CPU per
             request. Goals: p50 at 1 connection <= +100 us, throughput at 64 >= 0.8x memory.

Writes BASE.json and BASE.md (default load-tests/results/scale-out-<UTC>). Absolute numbers from a
shared 2-core machine hold for nothing: compare within a run. Goals are informational; with
--check the exit status is 1 when one fails. Only the Python standard library.
"""
import argparse
import datetime
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import lab as L  # noqa: E402

KEY = "sk-scale-0123456789abcdef0123456789"
MODEL = "mock-model"
THREADS = 12


def log(msg):
    print(f"[scale-out {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def post(addr, key=KEY, timeout=10.0):
    host, port = addr.rsplit(":", 1)
    try:
        c = http.client.HTTPConnection(host, int(port), timeout=timeout)
        c.request("POST", "/v1/chat/completions", body=L.chat_body(MODEL, max_tokens=4),
                  headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        r = c.getresponse()
        r.read()
        c.close()
        return r.status
    except OSError:
        return None


def get_json(addr, path, key=None):
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=5)
    c.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
    r = c.getresponse()
    data = json.loads(r.read() or b"null")
    c.close()
    return data


class Redis:
    def __init__(self, lab):
        self.port = L.free_port()
        self.proc = lab.spawn("redis", ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                        "--save", "", "--appendonly", "no"])
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.cli("PING").strip() == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING")

    def cli(self, *args):
        return subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True).stdout

    def commandstats(self):
        """{command: (calls, usec per call)} since the last CONFIG RESETSTAT."""
        out = {}
        for line in self.cli("INFO", "commandstats").splitlines():
            if line.startswith("cmdstat_"):
                name, _, fields = line.partition(":")
                f = dict(kv.split("=", 1) for kv in fields.strip().split(","))
                out[name[len("cmdstat_"):]] = (int(f["calls"]), float(f["usec_per_call"]))
        return out

    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"


def mock(lab, name, *extra):
    p = lab.spawn(name, lab.mock_pin + [os.path.join(L.BIN, "mock-engine"), "--listen", "127.0.0.1:0",
                                        "--model", MODEL, "--threads", "1", "--token-interval-ms", "0",
                                        *extra])
    addr = lab.first_line(name, p)
    return p, addr


def gateway(lab, name, yaml_text):
    cfg = os.path.join(lab.work, f"{name}.yaml")
    with open(cfg, "w") as f:
        f.write(yaml_text)
    exe = os.path.join(L.BIN, "infergate")
    chk = subprocess.run([exe, "--check", "--config", cfg], capture_output=True, text=True, timeout=60)
    if chk.returncode != 0:
        raise RuntimeError(f"infergate --check rejected {cfg}:\n{chk.stdout}{chk.stderr}")
    p = lab.spawn(name, [exe, "--config", cfg])
    line = lab.first_line(name, p)
    addr = line[len("infergate listening on http://"):].rstrip("/")
    return p, addr


def replica_yaml(lab, engine, keys_path, store, tag):
    data = os.path.join(lab.work, f"data-{tag}")
    return (f"server:\n  listen: \"127.0.0.1:0\"\n  threads: 1\n"
            f"pools:\n  - name: chat\n    models: [\"{MODEL}\"]\n    backends: [\"{engine}\"]\n"
            f"    health_check: {{ path: /health, interval: 1s }}\n"
            f"filters:\n  - auth: {{ api_keys_file: \"{keys_path}\" }}\n"
            f"  - limits:\n      data_dir: \"{data}\"\n      store: {store}\n")


def keys_file(lab, name, entry):
    path = os.path.join(lab.work, f"{name}.json")
    e = {"key": KEY, "user": "scale"}
    e.update(entry)
    with open(path, "w") as f:
        json.dump({"keys": [e, {"key": ADMIN, "user": "ops", "role": "admin"}]}, f)
    return path


def hammer(addrs, seconds=None, until=None):
    """THREADS threads posting round-robin over addrs; per-second 200 counts, refusals."""
    stop = time.time() + seconds if seconds else None
    lock = threading.Lock()
    ok_at, other = [], {}
    counter = [0]

    def worker():
        while True:
            if stop and time.time() >= stop:
                return
            if until and until():
                return
            with lock:
                i = counter[0]
                counter[0] += 1
            status = post(addrs[i % len(addrs)])
            with lock:
                if status == 200:
                    ok_at.append(time.time())
                else:
                    other[status] = other.get(status, 0) + 1

    t0 = time.time()
    ts = [threading.Thread(target=worker) for _ in range(THREADS)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return t0, ok_at, other


ADMIN = "sk-scale-admin-0123456789abcdef01234"


def settled_total(gws, shared):
    """Tokens charged to the key: Redis' shared total, or the sum of each replica's own; read
    until two reads 300 ms apart agree (settlement runs in the background), at most 10 s."""
    def read():
        totals = []
        for g in gws:
            rows = get_json(g, "/admin/usage", key=ADMIN).get("data") or []
            totals.append(sum(r.get("quota_used") or 0 for r in rows if r.get("user") == "scale"))
        return max(totals) if shared else sum(totals)
    last, deadline = read(), time.time() + 10
    while time.time() < deadline:
        time.sleep(0.3)
        now = read()
        if now == last:
            return now
        last = now
    return last


def stats(addr):
    return get_json(addr, "/mock/stats")


def exactness(lab, redis, args):
    seconds = 3 if args.quick else 6
    out = {}
    for store_kind in ("memory", "redis"):
        store = "{ kind: memory }" if store_kind == "memory" else \
            f"{{ kind: redis, url: \"{redis.url()}\", on_error: fail_closed, lease: 5s }}"
        res = {}
        # rate
        redis.cli("FLUSHALL")
        _, eng = mock(lab, f"m-rate-{store_kind}")
        keys = keys_file(lab, f"k-rate-{store_kind}", {"limits": {"requests_per_second": 50, "burst": 50}})
        gws = [gateway(lab, f"gw-rate-{store_kind}-{i}", replica_yaml(lab, eng, keys, store, f"rate-{store_kind}-{i}"))[1]
               for i in range(3)]
        t0, ok_at, other = hammer(gws, seconds=seconds)
        steady = [t for t in ok_at if t >= t0 + 1.0]
        rate = len(steady) / (seconds - 1.0)
        res["rate"] = {"limit_per_s": 50, "admitted_per_s_after_burst": round(rate, 1), "admitted": len(ok_at),
                       "refused": other, "seconds": seconds}
        log(f"{store_kind}: rate {rate:.1f}/s after the first second (limit 50/s), refused {other}")
        # concurrency
        redis.cli("FLUSHALL")
        _, eng = mock(lab, f"m-conc-{store_kind}", "--ttft-ms", "300")
        keys = keys_file(lab, f"k-conc-{store_kind}", {"limits": {"concurrent": 4}})
        gws = [gateway(lab, f"gw-conc-{store_kind}-{i}", replica_yaml(lab, eng, keys, store, f"conc-{store_kind}-{i}"))[1]
               for i in range(3)]
        _, ok_at, other = hammer(gws, seconds=seconds)
        st = stats(eng)
        res["concurrency"] = {"limit": 4, "engine_max_active": st.get("max_active"), "admitted": len(ok_at),
                              "refused": other}
        log(f"{store_kind}: concurrency max_active at the engine {st.get('max_active')} (limit 4)")
        # quota
        redis.cli("FLUSHALL")
        _, eng = mock(lab, f"m-quota-{store_kind}")
        keys = keys_file(lab, f"k-quota-{store_kind}", {"quota": 3000})
        gws = [gateway(lab, f"gw-quota-{store_kind}-{i}", replica_yaml(lab, eng, keys, store, f"quota-{store_kind}-{i}"))[1]
               for i in range(3)]
        _, ok_at, other = hammer(gws, seconds=seconds)
        served = settled_total(gws, shared=store_kind == "redis")
        per_request = served / max(1, len(ok_at))
        res["quota"] = {"quota": 3000, "engine_tokens_served": served, "admitted": len(ok_at), "refused": other,
                        "tokens_per_request": round(per_request, 1)}
        log(f"{store_kind}: quota 3000, engine served {served} tokens in {len(ok_at)} requests")
        out[store_kind] = res
    return out


def cost(lab, redis, args):
    rounds = args.rounds or (1 if args.quick else 3)
    secs = 2 if args.quick else 5
    _, eng = mock(lab, "m-cost")
    lab.upstream = {"chat": eng, "stream": eng, "hold": eng, "abort": eng}
    with open(os.path.join(HERE, "configs", "infergate-all.yaml")) as f:
        base = f.read()
    subst = {"@MOCK@": eng, "@STREAM@": eng, "@HOLD@": eng, "@ABORT@": eng, "@THREADS@": "2",
             "@CONFIGS@": os.path.join(HERE, "configs")}
    gws = {}
    for kind in ("memory", "redis"):
        text = base
        for k, v in subst.items():
            text = text.replace(k, v)
        text = text.replace("@WORK@", os.path.join(lab.work, f"cost-{kind}"))
        if kind == "redis":
            text = text.rstrip("\n") + f"\n      store: {{ kind: redis, url: \"{redis.url()}\", on_error: fail_open }}\n"
        p, addr = gateway(lab, f"gw-cost-{kind}", text)
        deadline = time.time() + 30
        while post(addr, key="sk-bench-0000000000000000000000000000") != 200:
            if time.time() > deadline:
                raise RuntimeError(f"gw-cost-{kind} does not answer")
            time.sleep(0.1)
        gws[kind] = (p, addr)
    redis_pid = redis.proc.pid
    rows = {k: {1: [], 64: []} for k in gws}
    for r in range(rounds):
        for kind in (("memory", "redis") if r % 2 == 0 else ("redis", "memory")):
            p, addr = gws[kind]
            for conns in (1, 64):
                redis.cli("CONFIG", "RESETSTAT")
                cpu0 = L.cpu_seconds([p.pid])
                rcpu0 = L.cpu_seconds([redis_pid])
                x = run_wrk(lab, addr, conns, secs)
                cpu = L.cpu_seconds([p.pid]) - cpu0
                rcpu = L.cpu_seconds([redis_pid]) - rcpu0
                n = max(1, x["requests"])
                row = {"rps": x["requests"] / (x["duration_us"] / 1e6), "p50_us": x["latency_us"]["p50"],
                       "p99_us": x["latency_us"]["p99"], "cpu_us_per_req": cpu / n * 1e6,
                       "redis_cpu_us_per_req": rcpu / n * 1e6, "non2xx": x["errors"]["status"],
                       "redis_commands": redis.commandstats()}
                rows[kind][conns].append(row)
                log(f"cost r{r} {kind:6} c{conns:<2} {row['rps']:8.0f} req/s p50 {row['p50_us']} us "
                    f"p99 {row['p99_us']} us gw {row['cpu_us_per_req']:.1f} us/req redis {row['redis_cpu_us_per_req']:.1f} us/req non2xx {row['non2xx']}"
                    + "".join(f" {c} {v[0]}x{v[1]:.0f}us" for c, v in sorted(row["redis_commands"].items())))
    med = {}
    for kind, by in rows.items():
        med[kind] = {c: {k: statistics_median([r[k] for r in rs]) for k in rs[0] if k != "redis_commands"} for c, rs in by.items()}
    return {"rounds": rounds, "seconds": secs, "median": med, "raw": rows}


def statistics_median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def run_wrk(lab, addr, conns, secs):
    env = dict(os.environ, BENCH_KEY="sk-bench-0000000000000000000000000000")
    out = subprocess.run(lab.client_pin + ["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--timeout", "5s",
                                           "-s", os.path.join(HERE, "chat.lua"), f"http://{addr}/v1/chat/completions"],
                         capture_output=True, text=True, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            return json.loads(line[len("BENCHJSON "):])
    raise RuntimeError(f"no wrk summary: {out.stdout[-300:]} {out.stderr[-300:]}")


def goals(ex, co):
    g = []
    if ex:
        r = ex["redis"]["rate"]["admitted_per_s_after_burst"]
        g.append(("rate: 3 replicas share 50/s (redis): 50 +- 10 %", 45 <= r <= 55,
                  f"{r}/s (memory {ex['memory']['rate']['admitted_per_s_after_burst']}/s)"))
        m = ex["redis"]["concurrency"]["engine_max_active"]
        g.append(("concurrency 4 across replicas (redis): engine max_active <= 4", m is not None and m <= 4,
                  f"{m} (memory {ex['memory']['concurrency']['engine_max_active']})"))
        q = ex["redis"]["quota"]
        over = q["engine_tokens_served"] - q["quota"]
        bound = THREADS * q["tokens_per_request"]
        g.append(("quota 3,000 (redis): over by at most the reservations in flight", over <= bound,
                  f"served {q['engine_tokens_served']} (over {over}, bound {bound:.0f}); memory served "
                  f"{ex['memory']['quota']['engine_tokens_served']}"))
    if co:
        m, r = co["median"]["memory"], co["median"]["redis"]
        added = r[1]["p50_us"] - m[1]["p50_us"]
        g.append(("cost: p50 added at 1 connection <= 100 us", added <= 100,
                  f"+{added:.0f} us ({r[1]['p50_us']:.0f} vs {m[1]['p50_us']:.0f})"))
        ratio = r[64]["rps"] / m[64]["rps"]
        g.append(("cost: throughput at 64 connections >= 0.8x memory", ratio >= 0.8,
                  f"x{ratio:.2f} ({r[64]['rps']:.0f} vs {m[64]['rps']:.0f} req/s)"))
    return g


def report(base, meta, ex, co, g):
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "exactness": ex, "cost": co,
                   "goals": [{"goal": a, "pass": b, "figures": c} for a, b, c in g]}, f, indent=1)
    lines = [f"# Scale-out benchmark (issue #16), {meta['run']}", "",
             f"`load-tests/scale_out.py` — git {meta['git']}; {meta['redis']}; 2 cores, shared: compare within the run.", "",
             "## Goals (informational)", "", "| goal | result | figures |", "|---|---|---|"]
    for a, b, c in g:
        lines.append(f"| {a} | {'**PASS**' if b else '**FAIL**'} | {c} |")
    if ex:
        lines += ["", "## Exactness: 3 replicas, clients round-robin, 12 threads", "",
                  "| store | rate: admitted/s after the burst (limit 50) | concurrency: engine max_active (limit 4) | quota: tokens charged (quota 3,000) |",
                  "|---|---:|---:|---:|"]
        for k in ("memory", "redis"):
            e = ex[k]
            lines.append(f"| {k} | {e['rate']['admitted_per_s_after_burst']} | {e['concurrency']['engine_max_active']} | "
                         f"{e['quota']['engine_tokens_served']} |")
    if co:
        lines += ["", f"## Cost: one gateway, everything on (infergate-all.yaml), medians of {co['rounds']} rounds x {co['seconds']} s", "",
                  "| store | c1 p50 us | c1 p99 us | c1 CPU us/req: gateway / Redis | c64 req/s | c64 p99 us | c64 CPU us/req: gateway / Redis |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for k in ("memory", "redis"):
            m = co["median"][k]
            lines.append(f"| {k} | {m[1]['p50_us']:.0f} | {m[1]['p99_us']:.0f} | "
                         f"{m[1]['cpu_us_per_req']:.0f} / {m[1]['redis_cpu_us_per_req']:.0f} | {m[64]['rps']:.0f} | {m[64]['p99_us']:.0f} | "
                         f"{m[64]['cpu_us_per_req']:.0f} / {m[64]['redis_cpu_us_per_req']:.0f} |")
        lines += ["", "Redis commands per request with `store: redis` (INFO commandstats, last round; "
                  "script calls count the commands they run as well):", "",
                  "| connections | requests | EVALSHA per request | µs per EVALSHA (Redis' wall clock) | commands run by scripts per request |",
                  "|---:|---:|---:|---:|---:|"]
        for c in (1, 64):
            row = co["raw"]["redis"][c][-1]
            cmds = row.get("redis_commands", {})
            n = max(1, round(row["rps"] * co["seconds"]))
            ev = cmds.get("evalsha", (0, 0.0))
            inner = sum(v[0] for name, v in cmds.items() if name not in ("evalsha", "config|resetstat"))
            lines.append(f"| {c} | {n} | {ev[0] / n:.2f} | {ev[1]:.0f} | {inner / n:.1f} |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--out")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--scenario", choices=["exactness", "cost", "all"], default="all")
    args = ap.parse_args()
    for tool in ("redis-server", "redis-cli", "wrk"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: `make setup-test`")
    run = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = args.out or os.path.join(HERE, "results", f"scale-out-{'quick-' if args.quick else ''}{run}")
    git = subprocess.run(["git", "-C", L.REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", L.REPO, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    lab = L.Lab(threads=2)
    t0 = time.time()
    try:
        redis = Redis(lab)
        version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip()
        ex = exactness(lab, redis, args) if args.scenario in ("exactness", "all") else None
        co = cost(lab, redis, args) if args.scenario in ("cost", "all") else None
    finally:
        lab.stop_all()
    g = goals(ex, co)
    meta = {"run": run, "git": git + (" (dirty)" if dirty else ""), "redis": version.split(" ")[2] if version else "?",
            "seconds": round(time.time() - t0)}
    report(base, meta, ex, co, g)
    for a, b, c in g:
        log(f"{'PASS' if b else 'FAIL'}  {a}: {c}")
    log(f"results: {base}.json, {base}.md; done in {meta['seconds']} s")
    if args.check and not all(b for _, b, _ in g):
        sys.exit(1)


if __name__ == "__main__":
    main()
