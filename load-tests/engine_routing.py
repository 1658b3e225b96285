#!/usr/bin/env python3
"""engine_routing.py: the benchmark of engine-aware routing (issue #14), one command.

usage:
  load-tests/engine_routing.py [--scenario NAME ...] [--policies a,b,c] [--quick] [--check]
                               [--out BASE] [--rounds N] [--cost-rounds N] [--think-ms MS] [--seed N]
                               [--keep]

Every balance policy (round_robin, least_inflight, consistent_hash, load_aware,
prefix_aware) runs the same client load through infergate in front of 4 mock engines
that behave like engines with a scheduler and a prefix (KV) cache (`mock-engine
--max-running 4 --prefix-cache-tokens 20000 --prefill-us-per-token 50`). Each policy
gets freshly started mocks (cold caches) and a fresh gateway; shared-prefix and skewed
run every policy --rounds times (3; --quick 1), the order rotating, and report medians.

scenarios:
  shared-prefix  32 conversations x 8 turns (quick: 8 x 4), 16 in flight (a thread pool,
                 each worker runs whole conversations turn by turn). Each conversation has
                 its own ~2,000-word system prompt and a growing history (a ~50-word user
                 message per turn, then the assistant's answer as received). Streaming chat
                 completions with `x-session-id: conv-<n>`. Per policy: client TTFT (send ->
                 first SSE chunk with content) p50/p99/mean, the run's wall time, the
                 engines' cached-token share (GET /mock/stats), requests per engine, the
                 gateway's routing decisions (infergate_routing_decisions_total).
                 No think time between turns by default (--think-ms MS: uniform 0..MS): a
                 closed loop in lockstep, where least_inflight tends to send a conversation's
                 next turn back to the engine that just freed a slot (its last one).
                 Goals: prefix_aware TTFT p50 >= 3x lower and total time >= 1.5x shorter
                 than round_robin, and within 10 % of consistent_hash (TTFT p50, total).
  skewed         single-turn ~200-word random prompts (no shared prefix), 400 requests
                 (quick: 160), 16 in flight, streaming, no session header; engine e0 is slow
                 (`--ttft-ms 300`). round_robin, least_inflight, load_aware, prefix_aware:
                 full-response latency p50/p99 (send -> [DONE]; TTFT too) and the share of
                 requests the slow engine got. Goals: load_aware and prefix_aware p99 within
                 10 % of least_inflight's (no worse); load_aware gives the slow engine a
                 smaller share than round_robin.
  cost           the gateway's CPU per request (/proc user+sys) and latency, prefix_aware vs
                 round_robin, closed loop: wrk -t1 -c16, non-streaming short chats (64
                 sessions, each a distinct ~150-word system prompt, max_tokens 8), mocks
                 without delays; both gateways on the same mocks, alternating, 3 rounds x 5 s
                 (quick: 2 x 2 s; --cost-rounds N), medians.

A policy the gateway binary refuses (`infergate --check` on the generated config) is
reported "unsupported by this binary", its goals "n/a". Goals are informational: the
exit status is 0 unless --check is given, then 1 when a goal fails or cannot be
evaluated. Writes BASE.json and BASE.md (default load-tests/results/engine-routing-<UTC>,
with --quick engine-routing-quick-<UTC>). Absolute numbers from a shared 2-core machine
hold for nothing: compare policies within one run. Only the Python standard library.
"""
import argparse
import datetime
import http.client
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import string
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lab as lablib  # noqa: E402
from lab import BIN, HERE, REPO, cpu_seconds, fmt, goal  # noqa: E402

MODEL = "mock-model"
POLICIES = ["round_robin", "least_inflight", "consistent_hash", "load_aware", "prefix_aware"]
ENGINE_AWARE = {"load_aware", "prefix_aware"}
SCENARIOS = ["shared-prefix", "skewed", "cost"]
SCENARIO_POLICIES = {
    "shared-prefix": POLICIES,
    "skewed": ["round_robin", "least_inflight", "load_aware", "prefix_aware"],
    "cost": ["round_robin", "prefix_aware"],
}
ENGINES = 4
# the engine the issue describes: a scheduler with 4 slots and a prefix cache
ENGINE_ARGS = ["--max-running", "4", "--prefix-cache-tokens", "20000", "--prefill-us-per-token", "50",
               "--tokens", "16", "--token-interval-ms", "5"]
SLOW_TTFT_MS = 300
SESSION_HEADER = "x-session-id"
DECISIONS = ["prefix_hit", "load_fallback", "no_match", "session"]
REQUEST_TIMEOUT_S = 30      # per socket operation
REQUEST_DEADLINE_S = 120    # per request, in all
STOP = threading.Event()    # set on Ctrl-C / SIGTERM: workers stop between requests


def log(msg):
    print(f"[engine-routing {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ statistics
def pct(xs, p):
    """Nearest-rank percentile of a list (None when empty)."""
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def mean(xs):
    return statistics.fmean(xs) if xs else None


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ms(x):
    return None if x is None else round(x * 1000, 2)


# ------------------------------------------------------------------ HTTP
def http_get(addr, path, timeout=5.0):
    """GET; (status, body bytes) or (None, error text)."""
    host, port = addr.rsplit(":", 1)
    try:
        c = http.client.HTTPConnection(host, int(port), timeout=timeout)
        c.request("GET", path)
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, data
    except (OSError, http.client.HTTPException) as e:
        return None, str(e).encode()


PROM_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
PROM_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def prom_samples(text):
    """[(name, {label: value}, float)] of a Prometheus text exposition."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = PROM_LINE.match(line)
        if not m:
            continue
        try:
            v = float(m.group(3))
        except ValueError:
            continue
        out.append((m.group(1), dict(PROM_LABEL.findall(m.group(2) or "")), v))
    return out


def scrape(addr):
    status, data = http_get(addr, "/metrics")
    return prom_samples(data.decode(errors="replace")) if status == 200 else []


class Client:
    """One keep-alive connection per worker thread."""

    def __init__(self, addr):
        self.host, port = addr.rsplit(":", 1)
        self.port = int(port)
        self.local = threading.local()

    def conn(self):
        c = getattr(self.local, "conn", None)
        if c is None:
            c = http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT_S)
            self.local.conn = c
        return c

    def drop(self):
        c = getattr(self.local, "conn", None)
        if c is not None:
            c.close()
        self.local.conn = None

    def chat_stream(self, body, headers):
        """POST a streaming chat completion and read it to the end.

        ttft_s: from just before the request is written to the first SSE `data:` event
        whose delta carries non-empty content (the role-only first event does not count);
        total_s: to `data: [DONE]`. One retry when a kept-alive connection turns out
        closed before any response (nothing was processed)."""
        h = {"Content-Type": "application/json", **headers}
        res = {"ok": False, "status": None, "ttft_s": None, "total_s": None, "content": "", "backend": None,
               "prompt_tokens": None, "cached_tokens": None, "error": None, "retried": False}
        for attempt in (0, 1):
            c = self.conn()
            t0 = time.perf_counter()
            try:
                c.request("POST", "/v1/chat/completions", body=body, headers=h)
                r = c.getresponse()
                break
            except (ConnectionError, http.client.BadStatusLine) as e:  # stale keep-alive
                self.drop()
                if attempt == 0:
                    res["retried"] = True
                    continue
                res["error"] = f"connect/send: {e!r}"
                return res
            except (OSError, http.client.HTTPException) as e:
                self.drop()
                res["error"] = f"send: {e!r}"
                return res
        res["status"] = r.status
        res["backend"] = r.getheader("x-mock-instance")
        res["prompt_tokens"] = _int(r.getheader("x-mock-prompt-tokens"))
        res["cached_tokens"] = _int(r.getheader("x-mock-cached-tokens"))
        deadline = t0 + REQUEST_DEADLINE_S
        parts, done = [], False
        try:
            if r.status != 200:
                res["error"] = f"HTTP {r.status}: {r.read()[:300].decode(errors='replace')}"
                self.drop()
                return res
            while time.perf_counter() < deadline:
                line = r.readline()
                if not line:
                    break
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                try:
                    ev = json.loads(payload)
                except ValueError:
                    res["error"] = f"bad SSE event: {payload[:200]!r}"
                    break
                if "error" in ev:
                    res["error"] = f"stream error event: {json.dumps(ev['error'])[:300]}"
                    break
                for ch in ev.get("choices") or []:
                    text = (ch.get("delta") or {}).get("content")
                    if text:
                        if res["ttft_s"] is None:
                            res["ttft_s"] = time.perf_counter() - t0
                        parts.append(text)
            res["total_s"] = time.perf_counter() - t0
            if done:
                r.read()  # the chunked body's end, so the connection can be reused
            else:
                self.drop()
                res["error"] = res["error"] or ("deadline passed" if time.perf_counter() >= deadline
                                                else "stream ended without [DONE]")
        except (OSError, http.client.HTTPException) as e:
            self.drop()
            res["error"] = f"read: {e!r}"
            return res
        res["content"] = "".join(parts)
        res["ok"] = done and res["error"] is None and res["ttft_s"] is not None
        if done and res["ttft_s"] is None and res["error"] is None:
            res["error"] = "no content chunk"
        return res


def _int(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------ processes
class Lab(lablib.Lab):
    """lab.Lab (spawn, ready lines, stop everything on exit) plus stopping one
    policy's processes between policies."""

    def stop_some(self, procs):
        mine = [(p, s) for p, s in self.procs if p in procs]
        for p, sig in mine:
            if p.poll() is None:
                try:
                    p.send_signal(sig)
                except OSError:
                    pass
        deadline = time.time() + 5
        for p, _ in mine:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = [(p, s) for p, s in self.procs if p not in procs]


def start_mocks(lab, tag, per_engine_args):
    """One mock per argument list; returns [(name, addr, Popen)] once each answers /health."""
    out = []
    for i, extra in enumerate(per_engine_args):
        name = f"{tag}-e{i}"
        p = lab.spawn(name, [os.path.join(BIN, "mock-engine"), "--listen", "127.0.0.1:0",
                             "--model", MODEL, "--name", f"e{i}"] + extra)
        addr = lab.first_line(name, p, timeout=15)
        out.append((f"e{i}", addr, p))
    for name, addr, p in out:
        deadline = time.time() + 15
        while True:
            status, _ = http_get(addr, "/health", timeout=2)
            if status == 200:
                break
            if p.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mock {tag}-{name} on {addr} not healthy; see {lab.work}/{tag}-{name}.err")
            time.sleep(0.05)
    return out


def gateway_yaml(policy, backends, threads, load_threshold, engine_interval):
    lines = [
        "# written by load-tests/engine_routing.py",
        f'server: {{ listen: "127.0.0.1:0", threads: {threads} }}',
        "pools:",
        "  - name: chat",
        f'    models: ["{MODEL}"]',
        "    backends: [" + ", ".join(f'"{b}"' for b in backends) + "]",
        f"    balance: {policy}",
        f"    hash_header: {SESSION_HEADER}",
        "    health_check: { interval: 1s }",
    ]
    if policy in ENGINE_AWARE:  # keys an older binary refuses: only where they mean something
        lines.append(f"    engine_metrics: {{ interval: {engine_interval} }}")
    if policy == "prefix_aware":
        lines.append(f"    prefix_aware: {{ load_threshold: {load_threshold} }}")
    return "\n".join(lines) + "\n"


def check_config(lab, name, text):
    """(accepted, message) from `infergate --check`."""
    path = os.path.join(lab.work, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(text)
    try:
        p = subprocess.run([os.path.join(BIN, "infergate"), "--check", "--config", path],
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return False, "infergate --check timed out"
    msg = (p.stdout + p.stderr).strip()
    return p.returncode == 0, msg


def check_errors(msg):
    """The error lines of `infergate --check` output (its first line names the file)."""
    lines = [ln.strip() for ln in msg.splitlines()[1:] if ln.strip()]
    return "; ".join(lines) if lines else msg.strip()


def policy_support(lab, policies, args):
    """Which policies this infergate binary accepts (a config with placeholder backends)."""
    out = {}
    for pol in policies:
        ok, msg = check_config(lab, f"support-{pol}", gateway_yaml(
            pol, [f"127.0.0.1:{9 + i}" for i in range(ENGINES)], args.threads, args.load_threshold,
            args.engine_interval))
        out[pol] = None if ok else "unsupported by this binary: " + check_errors(msg)
    return out


LOG_LINE = re.compile(r"^\[\S+\s+(\w+)\s+([^\]]+)\]\s*(.*)$")


class Gateway:
    def __init__(self, name, addr, proc, cfg_text, err_path):
        self.name, self.addr, self.proc, self.cfg_text, self.err_path = name, addr, proc, cfg_text, err_path

    def log_findings(self):
        """WARN/ERROR lines of the gateway's log (but the NVML notice of GPU-less machines):
        their count, and each distinct message (timestamp dropped) with its count."""
        kinds = {}
        try:
            with open(self.err_path, errors="replace") as f:
                for ln in f:
                    if not (" WARN " in ln or " ERROR " in ln or "panick" in ln) or "NVML" in ln:
                        continue
                    m = LOG_LINE.match(ln.strip())
                    key = f"{m.group(1)} {m.group(2)}: {m.group(3)}" if m else ln.strip()
                    kinds[key[:300]] = kinds.get(key[:300], 0) + 1
        except OSError:
            pass
        return {"count": sum(kinds.values()), "kinds": kinds}


def start_gateway(lab, name, policy, backends, args):
    text = gateway_yaml(policy, backends, args.threads, args.load_threshold, args.engine_interval)
    ok, msg = check_config(lab, name, text)
    if not ok:
        raise Unsupported("unsupported by this binary: " + check_errors(msg))
    p = lab.spawn(name, [os.path.join(BIN, "infergate"), "--config", os.path.join(lab.work, f"{name}.yaml")],
                  stop=signal.SIGINT)
    line = lab.first_line(name, p, timeout=30)
    prefix = "infergate listening on http://"
    if not line.startswith(prefix):
        raise RuntimeError(f"unexpected ready line from {name}: {line!r}")
    gw = Gateway(name, line[len(prefix):].rstrip("/"), p, text, os.path.join(lab.work, f"{name}.err"))
    wait_healthy(gw, backends, policy)
    return gw


class Unsupported(Exception):
    pass


def wait_healthy(gw, backends, policy, timeout=30):
    """Until every backend passed its health check (infergate_backend_healthy = 1) and, for
    the engine-aware policies, the gateway has scraped each backend's /metrics once
    (infergate_engine_metrics_scrapes_total{result="ok"} >= 1 for each; 5 s at most)."""
    deadline = time.time() + timeout
    while True:
        healthy = {lb.get("backend") for n, lb, v in scrape(gw.addr)
                   if n == "infergate_backend_healthy" and v == 1}
        if all(b in healthy for b in backends):
            break
        if gw.proc.poll() is not None:
            raise RuntimeError(f"{gw.name} exited; see {gw.err_path}")
        if time.time() > deadline:
            raise RuntimeError(f"{gw.name}: backends not all healthy within {timeout}s (healthy: {sorted(healthy)})")
        time.sleep(0.05)
    if policy in ENGINE_AWARE:
        deadline = time.time() + 5
        while time.time() < deadline:
            scraped = {lb.get("backend") for n, lb, v in scrape(gw.addr)
                       if n == "infergate_engine_metrics_scrapes_total" and lb.get("result") == "ok" and v >= 1}
            if all(b in scraped for b in backends):
                return
            if gw.proc.poll() is not None:
                raise RuntimeError(f"{gw.name} exited; see {gw.err_path}")
            time.sleep(0.05)
        log(f"{gw.name}: not every backend's engine metrics scraped once "
            "(infergate_engine_metrics_scrapes_total{result=\"ok\"}) after 5 s; going on")


def mock_stats(engines):
    out = {}
    for name, addr, _ in engines:
        status, data = http_get(addr, "/mock/stats")
        out[name] = json.loads(data) if status == 200 else {"error": data.decode(errors="replace")}
    return out


def routing_decisions(samples):
    """{pool: {decision: count}} from infergate_routing_decisions_total."""
    out = {}
    for n, lb, v in samples:
        if n == "infergate_routing_decisions_total":
            out.setdefault(lb.get("pool", "?"), {})[lb.get("decision", "?")] = int(v)
    return out


def backend_requests(samples, addr_names):
    return {addr_names.get(lb.get("backend"), lb.get("backend")): int(v) for n, lb, v in samples
            if n == "infergate_backend_requests_total"}


# ------------------------------------------------------------------ workloads
LETTERS = string.ascii_lowercase


def words(rng, n):
    return " ".join("".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8))) for _ in range(n))


def make_conversations(seed, n_conv, turns, system_words, user_words):
    convs = []
    for n in range(n_conv):
        rng = random.Random(f"{seed}-conv-{n}")
        convs.append({"system": words(rng, system_words), "users": [words(rng, user_words) for _ in range(turns)]})
    return convs


def run_conversations(gw_addr, convs, workers, think_ms=0, seed=1):
    """Each worker runs whole conversations, turn by turn (with think_ms > 0, a pause of
    uniform 0..think_ms ms between a conversation's turns); returns (per-request results, wall s)."""
    client = Client(gw_addr)
    results, lock = [], threading.Lock()

    def conversation(n):
        conv = convs[n]
        think = random.Random(f"{seed}-think-{n}")
        messages = [{"role": "system", "content": conv["system"]}]
        for t, user in enumerate(conv["users"]):
            if t and think_ms and STOP.wait(think.uniform(0, think_ms) / 1000):
                return
            if STOP.is_set():
                return
            messages.append({"role": "user", "content": user})
            body = json.dumps({"model": MODEL, "stream": True, "messages": messages}).encode()
            r = client.chat_stream(body, {SESSION_HEADER: f"conv-{n}"})
            r.update(conv=n, turn=t)
            content = r.pop("content")
            with lock:
                results.append(r)
            if not r["ok"]:
                return  # the history would diverge: the conversation ends here
            messages.append({"role": "assistant", "content": content})

    t0 = time.perf_counter()
    run_pool(workers, [(conversation, n) for n in range(len(convs))])
    return results, time.perf_counter() - t0


def run_pool(workers, calls):
    """Run fn(arg) calls on a pool; on Ctrl-C the workers stop between requests (STOP)
    and the processes they talk to are stopped by the caller."""
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for f in as_completed([pool.submit(fn, *a) for fn, *a in calls]):
            f.result()
    except BaseException:
        STOP.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def run_single_turns(gw_addr, bodies, workers):
    client = Client(gw_addr)
    results, lock = [], threading.Lock()
    it = iter(range(len(bodies)))
    it_lock = threading.Lock()

    def worker():
        while not STOP.is_set():
            with it_lock:
                i = next(it, None)
            if i is None:
                return
            r = client.chat_stream(bodies[i], {})
            r.pop("content")
            r["i"] = i
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    run_pool(workers, [(worker,) for _ in range(workers)])
    return results, time.perf_counter() - t0


def errors_of(results):
    errs = [r for r in results if not r["ok"]]
    return {"count": len(errs), "first": sorted({r["error"] or "?" for r in errs})[:5]}


# ------------------------------------------------------------------ (1) shared prefix
def shared_prefix(lab, args, policies, support):
    p = {"conversations": 8 if args.quick else 32, "turns": 4 if args.quick else 8, "in_flight": 16,
         "system_words": 2000, "user_words": 50, "think_ms": args.think_ms, "rounds": args.rounds,
         "engines": ENGINES,
         "engine_args": " ".join(ENGINE_ARGS)}
    p["in_flight"] = min(p["in_flight"], p["conversations"])
    convs = make_conversations(args.seed, p["conversations"], p["turns"], p["system_words"], p["user_words"])
    log(f"shared-prefix: {p['conversations']} conversations x {p['turns']} turns, {p['in_flight']} in flight, "
        f"~{p['system_words']}-word system prompts, think time 0..{p['think_ms']} ms; mocks: {p['engine_args']}")
    return {"params": p, "policies": over_rounds(
        "shared-prefix", args, policies, support,
        lambda pol, r: one_policy(lab, f"sp-{pol}-r{r}", pol, [ENGINE_ARGS] * ENGINES, args,
                                  lambda addr: run_conversations(addr, convs, p["in_flight"], p["think_ms"],
                                                                 args.seed),
                                  conversational=True))}


def over_rounds(scen, args, policies, support, run_one):
    """run_one(policy, round) for every supported policy, --rounds times (the order rotating
    every round); one round: its figures as they are; more: medians (sums for counts)."""
    runs = {pol: [] for pol in policies}
    out = {}
    for pol in policies:
        if support.get(pol):
            out[pol] = {"unsupported": support[pol]}
            log(f"{scen} {pol}: {support[pol]}")
    todo = [pol for pol in policies if pol not in out]
    for r in range(args.rounds):
        k = r % max(len(todo), 1)
        for pol in todo[k:] + todo[:k]:
            if pol in out:  # refused by --check on its real config
                continue
            x = run_one(pol, r)
            if "unsupported" in x:
                out[pol] = x
            else:
                runs[pol].append(x)
    for pol in policies:
        if pol not in out:
            out[pol] = runs[pol][0] if len(runs[pol]) == 1 else aggregate(runs[pol])
    return {pol: out[pol] for pol in policies}


def aggregate(rs):
    """Medians of the per-round figures, sums of the counts; the rounds themselves under "rounds"."""
    def mdict(key):
        return {k: med([(x.get(key) or {}).get(k) for x in rs]) for k in (rs[0].get(key) or {})}

    def sdict(key):
        d = {}
        for x in rs:
            for k, v in (x.get(key) or {}).items():
                d[k] = d.get(k, 0) + (v or 0)
        return dict(sorted(d.items()))
    out = {"rounds_n": len(rs), "ttft_ms": mdict("ttft_ms"), "latency_ms": mdict("latency_ms"),
           "wall_s": med([x["wall_s"] for x in rs]), "gateway_cpu_s": med([x["gateway_cpu_s"] for x in rs])}
    for k in ("requests", "ok", "retries", "prompt_tokens", "cached_prompt_tokens"):
        out[k] = sum(x[k] or 0 for x in rs)
    out["cached_share_rounds"] = [x["cached_share"] for x in rs]
    out["cached_share"] = med(out["cached_share_rounds"])
    for k in ("per_engine_requests", "client_per_engine", "gateway_backend_requests"):
        out[k] = sdict(k)
    out["routing_decisions"] = {}
    for x in rs:
        for pool, d in x["routing_decisions"].items():
            for k, v in d.items():
                out["routing_decisions"].setdefault(pool, {})[k] = out["routing_decisions"].get(pool, {}).get(k, 0) + v
    out["errors"] = {"count": sum(x["errors"]["count"] for x in rs),
                     "first": sorted({e for x in rs for e in x["errors"]["first"]})[:5]}
    kinds = {}
    for x in rs:
        for k, v in x["gateway_log"]["kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
    out["gateway_log"] = {"count": sum(kinds.values()), "kinds": kinds}
    out["per_engine"] = {}
    for x in rs:
        for eng, d in x["per_engine"].items():
            a = out["per_engine"].setdefault(eng, {})
            for k, v in d.items():
                a[k] = max(a.get(k) or 0, v or 0) if k.startswith("max_") else (a.get(k) or 0) + (v or 0)
    if "slow_max_queued" in rs[0]:
        out["slow_max_queued"] = max(x["slow_max_queued"] or 0 for x in rs)
    if "slow_share" in rs[0]:
        out["slow_share_rounds"] = [x["slow_share"] for x in rs]
        out["slow_share"] = med(out["slow_share_rounds"])
    missing = sorted({k for x in rs for k in x.get("mock_stats_missing", [])})
    if missing:
        out["mock_stats_missing"] = missing
    out["rounds"] = rs
    return out


def one_policy(lab, tag, pol, engine_args, args, drive, conversational=False):
    """Fresh mocks + a fresh gateway for one policy, the load, the figures."""
    engines = start_mocks(lab, tag, engine_args)
    procs = [e[2] for e in engines]
    try:
        names = {addr: name for name, addr, _ in engines}
        try:
            gw = start_gateway(lab, f"{tag}-gw", pol, [a for _, a, _ in engines], args)
        except Unsupported as e:
            log(f"{tag}: {e}")
            return {"unsupported": str(e)}
        procs.append(gw.proc)
        log(f"{tag}: gateway {gw.addr} (pid {gw.proc.pid}) over {', '.join(f'{n}={a}' for a, n in names.items())}")
        cpu0 = cpu_seconds([gw.proc.pid])
        results, wall = drive(gw.addr)
        cpu1 = cpu_seconds([gw.proc.pid])
        samples = scrape(gw.addr)
        stats = mock_stats(engines)
        if gw.proc.poll() is not None:
            raise RuntimeError(f"{gw.name} exited during the run; see {gw.err_path}")
        ok = [r for r in results if r["ok"]]
        ttft = [r["ttft_s"] for r in ok]
        total = [r["total_s"] for r in ok]
        prompt = sum(s.get("prompt_tokens", 0) for s in stats.values())
        cached = sum(s.get("cached_prompt_tokens", 0) for s in stats.values())
        res = {
            "requests": len(results), "ok": len(ok), "errors": errors_of(results),
            "retries": sum(1 for r in results if r["retried"]),
            "wall_s": round(wall, 3),
            "ttft_ms": {"p50": ms(pct(ttft, 50)), "p90": ms(pct(ttft, 90)), "p99": ms(pct(ttft, 99)),
                        "mean": ms(mean(ttft)), "max": ms(max(ttft, default=None))},
            "latency_ms": {"p50": ms(pct(total, 50)), "p90": ms(pct(total, 90)), "p99": ms(pct(total, 99)),
                           "mean": ms(mean(total))},
            "prompt_tokens": prompt, "cached_prompt_tokens": cached,
            "cached_share": round(cached / prompt, 4) if prompt else None,
            "per_engine_requests": {n: s.get("requests") for n, s in stats.items()},
            "per_engine": {n: {k: s.get(k) for k in ("requests", "started", "prompt_tokens", "cached_prompt_tokens",
                                                     "max_active", "max_queued", "cache_evictions")}
                           for n, s in stats.items()},
            "client_per_engine": count_by(r["backend"] for r in results),
            "gateway_backend_requests": backend_requests(samples, names),
            "routing_decisions": routing_decisions(samples),
            "gateway_cpu_s": round(cpu1 - cpu0, 3),
            "gateway_log": gw.log_findings(),
            "engines": names,
        }
        if conversational:
            follow = [r["ttft_s"] for r in ok if r["turn"] > 0]
            first = [r["ttft_s"] for r in ok if r["turn"] == 0]
            res["ttft_ms"]["first_turn_p50"] = ms(pct(first, 50))
            res["ttft_ms"]["follow_up_p50"] = ms(pct(follow, 50))
            res["ttft_ms"]["follow_up_p99"] = ms(pct(follow, 99))
        missing = [k for k in ("prompt_tokens", "cached_prompt_tokens", "requests")
                   if any(k not in s for s in stats.values())]
        if missing:
            res["mock_stats_missing"] = missing
        dec = res["routing_decisions"].get("chat", {})
        log(f"{tag}: {res['ok']}/{res['requests']} ok in {wall:.2f}s; TTFT p50 {res['ttft_ms']['p50']} ms "
            f"p99 {res['ttft_ms']['p99']} ms; latency p99 {res['latency_ms']['p99']} ms; cached "
            f"{res['cached_share']}; per engine {res['per_engine_requests']}"
            + (f"; decisions {dec}" if dec else "") + (f"; errors {res['errors']}" if res['errors']['count'] else ""))
        return res
    finally:
        lab.stop_some(procs)


def count_by(xs):
    out = {}
    for x in xs:
        out[x or "?"] = out.get(x or "?", 0) + 1
    return dict(sorted(out.items()))


# ------------------------------------------------------------------ (2) skewed
def skewed(lab, args, policies, support):
    p = {"requests": 160 if args.quick else 400, "in_flight": 16, "prompt_words": 200, "engines": ENGINES,
         "slow_engine": "e0", "slow_ttft_ms": SLOW_TTFT_MS, "rounds": args.rounds,
         "engine_args": " ".join(ENGINE_ARGS)}
    rng = random.Random(f"{args.seed}-skewed")
    bodies = [json.dumps({"model": MODEL, "stream": True,
                          "messages": [{"role": "user", "content": words(rng, p["prompt_words"])}]}).encode()
              for _ in range(p["requests"])]
    engine_args = [ENGINE_ARGS + ["--ttft-ms", str(SLOW_TTFT_MS)]] + [ENGINE_ARGS + ["--ttft-ms", "0"]] * (ENGINES - 1)
    log(f"skewed: {p['requests']} single-turn requests, {p['in_flight']} in flight; e0 --ttft-ms {SLOW_TTFT_MS}")
    def run_one(pol, rnd):
        r = one_policy(lab, f"sk-{pol}-r{rnd}", pol, engine_args, args,
                       lambda addr: run_single_turns(addr, bodies, p["in_flight"]))
        if "unsupported" not in r:
            n = sum(v or 0 for v in r["per_engine_requests"].values())
            r["slow_share"] = round((r["per_engine_requests"].get("e0") or 0) / n, 4) if n else None
            r["slow_max_queued"] = r["per_engine"].get("e0", {}).get("max_queued")
            log(f"sk-{pol}-r{rnd}: slow engine share {r['slow_share']}, at most {r['slow_max_queued']} queued there")
        return r
    return {"params": p, "policies": over_rounds("skewed", args, policies, support, run_one)}


# ------------------------------------------------------------------ (3) cost
WRK_LUA = r"""
-- written by load-tests/engine_routing.py: one pre-formatted request per session, in turn
local reqs, i = {}, 0
function init(args)
  local n = 0
  for line in io.lines(os.getenv("ER_BODIES")) do
    n = n + 1
    reqs[n] = wrk.format("POST", nil, {["Content-Type"] = "application/json",
                                       ["x-session-id"] = "conv-" .. n}, line)
  end
end
function request()
  i = i % #reqs + 1
  return reqs[i]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


def wrk_run(lab, gw, conns, seconds, env):
    url = f"http://{gw.addr}/v1/chat/completions"
    c0 = cpu_seconds([gw.proc.pid])
    p = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s",
                        "-s", os.path.join(lab.work, "cost.lua"), url],
                       capture_output=True, text=True, env=env, timeout=seconds + 60)
    c1 = cpu_seconds([gw.proc.pid])
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"no summary from wrk: {p.stdout[-300:]} {p.stderr[-300:]}")
    w = json.loads(line[len("BENCHJSON "):])
    n = max(w["requests"], 1)
    e = w["errors"]
    return {"rps": round(w["requests"] / (w["duration_us"] / 1e6), 1), "requests": w["requests"],
            "p50_us": w["latency_us"]["p50"], "p99_us": w["latency_us"]["p99"],
            "gateway_cpu_us_per_req": round((c1 - c0) * 1e6 / n, 2),
            "non2xx": e["status"], "socket_errors": e["connect"] + e["read"] + e["write"] + e["timeout"]}


def cost(lab, args, policies, support):
    p = {"rounds": args.cost_rounds or (2 if args.quick else 3), "duration_s": 2 if args.quick else 5,
         "connections": 16,
         "sessions": 64, "system_words": 150, "max_tokens": 8, "engines": ENGINES,
         "engine_args": "--ttft-ms 0 --token-interval-ms 0 (no scheduler, no cache)"}
    out = {"params": p, "policies": {}}
    if not shutil.which("wrk"):
        out["skipped"] = "wrk not installed (apt-get install -y wrk)"
        log(f"cost: {out['skipped']}")
        return out
    rng = random.Random(f"{args.seed}-cost")
    bodies_path = os.path.join(lab.work, "cost-bodies.jsonl")
    with open(bodies_path, "w") as f:
        for _ in range(p["sessions"]):
            f.write(json.dumps({"model": MODEL, "max_tokens": p["max_tokens"],
                                "messages": [{"role": "system", "content": words(rng, p["system_words"])},
                                             {"role": "user", "content": "hi"}]}) + "\n")
    with open(os.path.join(lab.work, "cost.lua"), "w") as f:
        f.write(WRK_LUA)
    env = dict(os.environ, ER_BODIES=bodies_path)
    run_pols = []
    for pol in policies:
        if support.get(pol):
            out["policies"][pol] = {"unsupported": support[pol]}
            log(f"cost {pol}: {support[pol]}")
        else:
            run_pols.append(pol)
    if not run_pols:
        return out
    engines = start_mocks(lab, "cost", [["--ttft-ms", "0", "--token-interval-ms", "0"]] * ENGINES)
    procs = [e[2] for e in engines]
    try:
        backends = [a for _, a, _ in engines]
        gws = {}
        for pol in run_pols:
            try:
                gws[pol] = start_gateway(lab, f"cost-{pol}-gw", pol, backends, args)
                procs.append(gws[pol].proc)
            except Unsupported as e:
                out["policies"][pol] = {"unsupported": str(e)}
        log(f"cost: wrk -t1 -c{p['connections']}, {p['rounds']} rounds x {p['duration_s']} s, "
            f"gateways: {', '.join(f'{k} {g.addr}' for k, g in gws.items())}")
        for pol, gw in gws.items():  # warm-up: connection pools, allocators
            wrk_run(lab, gw, p["connections"], 1, env)
        raw = []
        order = list(gws)
        for r in range(p["rounds"]):
            k = r % len(order)
            for pol in order[k:] + order[:k]:
                if STOP.is_set():
                    raise KeyboardInterrupt
                x = wrk_run(lab, gws[pol], p["connections"], p["duration_s"], env)
                x.update(policy=pol, round=r)
                raw.append(x)
                log(f"cost round {r} {pol:<14} {x['rps']:>8.0f} req/s  p50 {x['p50_us']} us  p99 {x['p99_us']} us  "
                    f"gateway {x['gateway_cpu_us_per_req']:.1f} us/req  non2xx {x['non2xx']} "
                    f"socket errors {x['socket_errors']}")
        for pol, gw in gws.items():
            rs = [x for x in raw if x["policy"] == pol]
            samples = scrape(gw.addr)
            out["policies"][pol] = {
                "rps": med([x["rps"] for x in rs]), "p50_us": med([x["p50_us"] for x in rs]),
                "p99_us": med([x["p99_us"] for x in rs]),
                "gateway_cpu_us_per_req": med([x["gateway_cpu_us_per_req"] for x in rs]),
                "non2xx": sum(x["non2xx"] for x in rs), "socket_errors": sum(x["socket_errors"] for x in rs),
                "rounds": rs, "routing_decisions": routing_decisions(samples),
                "gateway_backend_requests": backend_requests(samples, {a: n for n, a, _ in engines}),
                "gateway_log": gw.log_findings()}
    finally:
        lab.stop_some(procs)
    out["policies"] = {pol: out["policies"][pol] for pol in policies if pol in out["policies"]}
    return out


# ------------------------------------------------------------------ goals and report

def get(res, scen, pol, *path):
    x = res.get(scen, {}).get("policies", {}).get(pol)
    if not x or "unsupported" in x or x.get("ok") == 0:
        return None
    for k in path:
        x = (x or {}).get(k)
    return x


def fv(x, unit=""):
    return "n/a (not run or unsupported)" if x is None else f"{x:,.4g}{unit}"


def goals(results):
    out = []
    if "shared-prefix" in results:
        s = "shared-prefix"
        pa, rr, ch = (get(results, s, p, "ttft_ms", "p50") for p in ("prefix_aware", "round_robin", "consistent_hash"))
        pat, rrt, cht = (get(results, s, p, "wall_s") for p in ("prefix_aware", "round_robin", "consistent_hash"))
        both = lambda a, b: None if a is None or b is None else True  # noqa: E731
        out.append(goal(s, "prefix_aware TTFT p50 >= 3x lower than round_robin",
                        both(pa, rr) and pa * 3 <= rr, f"{fv(pa, ' ms')} vs {fv(rr, ' ms')}" + ratio(rr, pa)))
        out.append(goal(s, "prefix_aware total time >= 1.5x shorter than round_robin",
                        both(pat, rrt) and pat * 1.5 <= rrt, f"{fv(pat, ' s')} vs {fv(rrt, ' s')}" + ratio(rrt, pat)))
        out.append(goal(s, "prefix_aware TTFT p50 within 10% of consistent_hash",
                        both(pa, ch) and pa <= ch * 1.10, f"{fv(pa, ' ms')} vs {fv(ch, ' ms')}" + ratio(pa, ch)))
        out.append(goal(s, "prefix_aware total time within 10% of consistent_hash",
                        both(pat, cht) and pat <= cht * 1.10, f"{fv(pat, ' s')} vs {fv(cht, ' s')}" + ratio(pat, cht)))
    if "skewed" in results:
        s = "skewed"
        li = get(results, s, "least_inflight", "latency_ms", "p99")
        for pol in ("prefix_aware", "load_aware"):
            v = get(results, s, pol, "latency_ms", "p99")
            out.append(goal(s, f"{pol} latency p99 within 10% of least_inflight (no worse)",
                            None if v is None or li is None else v <= li * 1.10,
                            f"{fv(v, ' ms')} vs {fv(li, ' ms')}" + ratio(v, li)))
        la, rr = get(results, s, "load_aware", "slow_share"), get(results, s, "round_robin", "slow_share")
        out.append(goal(s, "load_aware sends the slow engine less than round_robin",
                        None if la is None or rr is None else la < rr, f"share {fv(la)} vs {fv(rr)}"))
    return out


def ratio(a, b):
    return f" (x{a / b:.2f})" if a and b else ""


def dist(d):
    return " / ".join(f"{k} {v}" for k, v in sorted((d or {}).items()))


def markdown(res):
    m, R = res["meta"], res["results"]
    L = [f"# Engine-aware routing benchmark (issue #14), {m['timestamp']}{' (quick)' if m['quick'] else ''}", "",
         f"`{m['command']}` — infergate {m['binaries'].get('infergate_version')} "
         f"(built {m['binaries']['infergate']['mtime']}), git {m['git_rev']}{' (dirty)' if m['git_dirty'] else ''}; "
         f"{m['cores']} cores, load average {fmt(m['loadavg_start'][0], 2)} at start, "
         f"{fmt(m['loadavg_end'][0], 2)} at end; {m['duration_s']:.0f} s in all.", "",
         "Absolute numbers from a shared 2-core machine hold for nothing; compare policies within this run.", ""]
    if m.get("binaries_changed"):
        L += ["**Warning**: a binary in target/release was rebuilt during this run; figures may mix builds.", ""]
    if res["goals"]:
        L += ["## Goals (informational)", "", "| scenario | goal | result | figures |", "|---|---|---|---|"]
        L += [f"| {g['scenario']} | {g['goal']} | **{g['status']}** | {g['detail']} |" for g in res["goals"]]
        L.append("")
    if "shared-prefix" in R:
        s = R["shared-prefix"]
        p = s["params"]
        L += ["## shared-prefix", "", rounds_md(p),
              f"{p['conversations']} conversations × {p['turns']} turns, {p['in_flight']} in flight, ~{p['system_words']}"
              f"-word system prompt per conversation + ~{p['user_words']}-word user turns, streaming"
              + (f", think time uniform 0..{fmt(p['think_ms'], 0)} ms between turns" if p.get("think_ms") else
                 ", no think time") + ". 4 mocks: "
              f"`{p['engine_args']}`. TTFT = client send → first SSE chunk with content.", "",
              "| policy | TTFT p50 ms | p99 ms | mean ms | follow-up turns p50 ms | total s | cached share | "
              "requests per engine | errors |", "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
        for pol, x in s["policies"].items():
            if "unsupported" in x:
                L.append(unsupported_row(pol, x["unsupported"], 9))
                continue
            t = x["ttft_ms"]
            L.append(f"| {pol} | {fmt(t['p50'])} | {fmt(t['p99'])} | {fmt(t['mean'])} | {fmt(t.get('follow_up_p50'))} | "
                     f"{fmt(x['wall_s'], 2)} | {fmt(x['cached_share'] * 100 if x['cached_share'] is not None else None)} % | "
                     f"{dist(x['per_engine_requests'])} | {x['errors']['count']} |")
        L.append("")
        L += decisions_md(s["policies"])
    if "skewed" in R:
        s = R["skewed"]
        p = s["params"]
        L += ["## skewed", "", rounds_md(p),
              f"{p['requests']} single-turn requests (~{p['prompt_words']} random words, no shared prefix), "
              f"{p['in_flight']} in flight, streaming, no session header. 4 mocks `{p['engine_args']}`; "
              f"{p['slow_engine']} adds `--ttft-ms {p['slow_ttft_ms']}`. Latency = client send → `[DONE]` "
              "(full response); TTFT as above. Slow engine max queued: the most requests ever waiting for one of e0's "
              "4 slots (`max_queued` of its /mock/stats; the maximum over rounds).", "",
              "| policy | latency p50 ms | p90 ms | p99 ms | mean ms | TTFT p50 ms | TTFT p99 ms | slow engine share | "
              "slow engine max queued | requests per engine | total s | errors |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
        for pol, x in s["policies"].items():
            if "unsupported" in x:
                L.append(unsupported_row(pol, x["unsupported"], 12))
                continue
            lat = x["latency_ms"]
            L.append(f"| {pol} | {fmt(lat['p50'])} | {fmt(lat.get('p90'))} | {fmt(lat['p99'])} | {fmt(lat['mean'])} | "
                     f"{fmt(x['ttft_ms']['p50'])} | {fmt(x['ttft_ms']['p99'])} | "
                     f"{fmt(x['slow_share'] * 100 if x.get('slow_share') is not None else None)} % | "
                     f"{fmt(x.get('slow_max_queued'))} | "
                     f"{dist(x['per_engine_requests'])} | {fmt(x['wall_s'], 2)} | {x['errors']['count']} |")
        L.append("")
        L += decisions_md(s["policies"])
    if "cost" in R:
        s = R["cost"]
        p = s["params"]
        L += ["## cost", ""]
        if s.get("skipped"):
            L += [s["skipped"], ""]
        else:
            L += [f"wrk -t1 -c{p['connections']}, closed loop, non-streaming chats ({p['sessions']} sessions, "
                  f"~{p['system_words']}-word system prompt each, max_tokens {p['max_tokens']}), 4 mocks "
                  f"{p['engine_args']}; medians of {p['rounds']} rounds × {p['duration_s']} s, gateways alternating. "
                  "Latency = full response (wrk).", "",
                  "| policy | req/s | p50 µs | p99 µs | gateway CPU µs/request | non-2xx | socket errors |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
            for pol, x in s["policies"].items():
                if "unsupported" in x:
                    L.append(unsupported_row(pol, x["unsupported"], 7))
                    continue
                L.append(f"| {pol} | {fmt(x['rps'], 0)} | {fmt(x['p50_us'])} | {fmt(x['p99_us'])} | "
                         f"{fmt(x['gateway_cpu_us_per_req'])} | {x['non2xx']} | {x['socket_errors']} |")
            a, b = s["policies"].get("prefix_aware", {}), s["policies"].get("round_robin", {})
            if a.get("gateway_cpu_us_per_req") and b.get("gateway_cpu_us_per_req"):
                L += ["", f"prefix_aware / round_robin: CPU per request ×"
                          f"{a['gateway_cpu_us_per_req'] / b['gateway_cpu_us_per_req']:.2f}, p99 ×"
                          f"{a['p99_us'] / b['p99_us']:.2f}, req/s ×{a['rps'] / b['rps']:.2f}."]
            L.append("")
    notes = []
    for scen, s in R.items():
        for pol, x in s.get("policies", {}).items():
            if x.get("errors", {}).get("count"):
                notes.append(f"{scen} {pol}: {x['errors']['count']} failed requests: {'; '.join(x['errors']['first'])}")
            if x.get("gateway_log", {}).get("count"):
                notes.append(f"{scen} {pol}: gateway log: " + "; ".join(
                    f"{n} × `{k[:200]}`" for k, n in sorted(x["gateway_log"]["kinds"].items(), key=lambda kv: -kv[1])))
            if x.get("mock_stats_missing"):
                notes.append(f"{scen} {pol}: /mock/stats lacks {x['mock_stats_missing']}")
    if notes:
        L += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(L)


def unsupported_row(pol, msg, ncols):
    msg = msg.replace("|", "\\|")
    return f"| {pol} | {msg[:160]} |" + " |" * (ncols - 2)


def rounds_md(p):
    n = p.get("rounds", 1)
    return ("One round: every policy once, on fresh mocks and a fresh gateway." if n == 1 else
            f"{n} rounds (every policy on fresh mocks and a fresh gateway each round, the order rotating): "
            "latencies, total time and shares are medians over rounds, counts are sums.") + "\n"


def decisions_md(policies):
    rows = [(pol, x["routing_decisions"].get("chat", {})) for pol, x in policies.items()
            if "unsupported" not in x and x.get("routing_decisions", {}).get("chat")]
    if not rows:
        return []
    keys = DECISIONS + sorted({k for _, d in rows for k in d} - set(DECISIONS))
    L = ["Gateway routing decisions (`infergate_routing_decisions_total{pool=\"chat\"}`):", "",
         "| policy | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    L += [f"| {pol} | " + " | ".join(fmt(d.get(k, 0)) for k in keys) + " |" for pol, d in rows]
    return L + [""]


# ------------------------------------------------------------------ main
def sh(args):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30, cwd=REPO).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def binaries():
    out = {}
    for b in ("infergate", "mock-engine"):
        path = os.path.join(BIN, b)
        st = os.stat(path)
        out[b] = {"path": path, "size": st.st_size,
                  "mtime": datetime.datetime.fromtimestamp(st.st_mtime, datetime.timezone.utc)
                  .strftime("%Y-%m-%dT%H:%M:%SZ")}
    out["infergate_version"] = sh([os.path.join(BIN, "infergate"), "--version"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", action="append", choices=SCENARIOS,
                    help="repeatable; default: all (shared-prefix, skewed, cost)")
    ap.add_argument("--policies", help=f"comma-separated subset of {','.join(POLICIES)} (each scenario runs "
                                       "those of its own list that are given)")
    ap.add_argument("--quick", action="store_true", help="a smoke-sized run, ~30-40 s")
    ap.add_argument("--out", help="BASE of BASE.json and BASE.md")
    ap.add_argument("--check", action="store_true", help="exit 1 when a goal fails or cannot be evaluated")
    ap.add_argument("--seed", type=int, default=1, help="the prompts' words (1)")
    ap.add_argument("--threads", type=int, default=2, help="gateway worker threads (2)")
    ap.add_argument("--load-threshold", type=float, default=4, help="prefix_aware.load_threshold (4)")
    ap.add_argument("--engine-interval", default="250ms", help="engine_metrics.interval (250ms)")
    ap.add_argument("--rounds", type=int,
                    help="shared-prefix and skewed: run every policy N times, fresh processes each time, the "
                         "order rotating; report medians (3; --quick 1)")
    ap.add_argument("--cost-rounds", type=int, help="cost: wrk rounds per gateway (3; --quick 2)")
    ap.add_argument("--think-ms", type=float, default=0,
                    help="shared-prefix: a pause of uniform 0..MS between a conversation's turns (0)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = ap.parse_args()
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    scens = args.scenario or SCENARIOS
    scens = [s for s in SCENARIOS if s in scens]
    wanted = None
    if args.policies:
        wanted = [p.strip() for p in args.policies.split(",") if p.strip()]
        bad = [p for p in wanted if p not in POLICIES]
        if bad:
            ap.error(f"unknown policies {bad}; one of {', '.join(POLICIES)}")
    for b in ("infergate", "mock-engine"):
        if not os.access(os.path.join(BIN, b), os.X_OK):
            sys.exit(f"no {b} in {BIN}: cargo build --release --bins")
    ts = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = args.out or os.path.join(HERE, "results", f"engine-routing-{'quick-' if args.quick else ''}{ts}")
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)

    def on_signal(signum, _frame):
        STOP.set()
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also where a shell started us with SIGINT ignored
    started = time.time()
    lab = Lab(threads=args.threads, pin=False, keep=args.keep)
    meta = {"timestamp": ts, "quick": args.quick, "scenarios": scens, "seed": args.seed,
            "command": " ".join(["load-tests/engine_routing.py"] + sys.argv[1:]),
            "gateway_threads": args.threads, "load_threshold": args.load_threshold,
            "engine_interval": args.engine_interval, "binaries": binaries(),
            "cores": os.cpu_count(), "loadavg_start": os.getloadavg(), "python": platform.python_version(),
            "git_rev": sh(["git", "rev-parse", "--short", "HEAD"]),
            "git_dirty": bool(sh(["git", "status", "--porcelain", "--untracked-files=no"]))}
    res = {"meta": meta, "results": {}}
    log(f"scenarios {scens}; infergate {meta['binaries']['infergate_version']} built "
        f"{meta['binaries']['infergate']['mtime']}; load average {meta['loadavg_start']}; work dir {lab.work}")
    try:
        all_pols = sorted({p for s in scens for p in SCENARIO_POLICIES[s] if wanted is None or p in wanted},
                          key=POLICIES.index)
        support = policy_support(lab, all_pols, args)
        meta["support"] = {p: (v or "supported") for p, v in support.items()}
        log("policies: " + ", ".join(f"{p} {'ok' if not v else 'UNSUPPORTED'}" for p, v in support.items()))
        runners = {"shared-prefix": shared_prefix, "skewed": skewed, "cost": cost}
        for s in scens:
            pols = [p for p in SCENARIO_POLICIES[s] if wanted is None or p in wanted]
            if not pols:
                continue
            res["results"][s] = runners[s](lab, args, pols, support)
    except KeyboardInterrupt:
        STOP.set()
        log("interrupted; stopping everything")
        return 130
    finally:
        lab.stop_all()
    return lablib.finish(res, base, started, binaries(), goals, markdown, args.check, log)


if __name__ == "__main__":
    sys.exit(main())
