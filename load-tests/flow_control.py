#!/usr/bin/env python3
"""flow_control.py: the benchmark of flow control (issue #15), one command.

usage:
  load-tests/flow_control.py [--scenario NAME ...] [--quick] [--check] [--out BASE]
                             [--rounds N] [--duration S] [--phase-seconds S]
                             [--faults-seconds S] [--client-timeout S] [--keep]

infergate in front of mock engines that behave like engines with a scheduler
(`mock-engine --max-running 4`: 4 requests run at once, the rest wait in the engine's
FIFO queue). The client is this script's own open-loop asyncio client (raw HTTP/1.1,
keep-alive connections, one task per request, a fixed arrival rate per tenant, every
request bounded by --client-timeout): `loadgen load --rate` holds one request per
connection (a slow answer delays the next send) and cannot tell tenants, refusals or
SSE error events apart. Fresh mocks and a fresh gateway for every run.

scenarios:
  overload         3 mocks `--max-running 4 --ttft-ms 150`, non-streaming chat (a
                   non-streamed answer takes the TTFT: 150 ms), so capacity = 3 x 4 / 0.15 s
                   = 80 req/s. 2x capacity (160 req/s) offered for --duration s (120;
                   quick 20), twice: WITH the queue (`max_inflight: 4`, `queue: {max_len:
                   2 x capacity x max_wait = 320, max_wait: 2s}`) and WITHOUT (no
                   max_inflight: the engines queue internally, today's behaviour).
                   Per run: served req/s vs capacity (after a warm-up), the engines'
                   max_active/max_queued (/mock/stats), refusals (503 server_overloaded
                   with Retry-After? which bound? time to the 503 p50/p99), served
                   latency p50/p99, every other error. Goals (with the queue): served
                   within 5 % of capacity, engines never above max_inflight (max_active
                   <= 4 and max_queued = 0), every refusal a 503 server_overloaded with
                   Retry-After, 0 other errors.
  noisy-neighbour  4 mocks `--max-running 8 --ttft-ms 0`; each request's service time comes
                   from its `x-mock-prefill-us-per-token` header (the prompt is 2 tokens): B's
                   400 ms, A's uniform 200-600 ms (so the 32 slots free at random moments, not
                   in lockstep): capacity 32 / 0.4 s = 80 req/s. Gateway `max_inflight: 8`,
                   `queue: {max_len: 2000, max_wait: 2s}`, auth with two keys (tenant-a,
                   tenant-b; weight 1), non-streaming chat. Phases of --phase-seconds (30;
                   quick 10), each on fresh processes: b-alone (B at 0.25 x capacity = 20/s:
                   B's unloaded latency), a+b (A floods at 10x B's rate, same priority),
                   a+b-high (the same, B `priority: high`), backlogged (B at 0.6 x capacity
                   = 48/s, A at 480/s: both above their fair share, for the served shares),
                   a+b-small-queue (informational: a+b with queue.max_len 40), a+b-wait-6s
                   (informational: a+b with queue.max_wait 6s, 3x queue.aging).
                   Goals: a+b B p99 <= 1.5x b-alone's; a+b-high B p99 <= 1.2x b-alone's;
                   backlogged served A:B within 10 % of 1:1 and Jain's fairness index of
                   the served rates >= 0.95.
  faults           3 mocks `--ttft-ms 20 --tokens 16 --token-interval-ms 10`, streaming
                   chat at 30 req/s for --faults-seconds (45; quick 15); gateway
                   max_inflight 16 (not saturated), retries 1, retry_budget 0.2,
                   ejection {consecutive_failures 5, base_time 1s, max_time 10s},
                   health checks every 1 s. Faults, one at a time: e0 SIGKILLed and
                   restarted on its port; e1 `POST /mock/fault {"reset": true}` (closes
                   every inference connection before the response head) then off; e2
                   `POST /mock/fault {"fail_status": 503}` then off. GET /services is
                   polled every 50 ms for `ejected`/`healthy`. Goals: every client error
                   is a stream that had started on e0 before the kill and ended with an
                   SSE error event; e1 and e2 ejected; e0 out of rotation (ejected or
                   unhealthy); every backend back in rotation afterwards. Then, on the same
                   gateway, an abandoned half-open probe: e2 ejected by 503s and healed;
                   once half-open, slow requests whose clients leave after 0.3 s (before the
                   response head) until one reached e2; goal: e2 back in rotation within 10 s.
  cost             the gateway's CPU per request (/proc user+sys) with the queue on but
                   never saturated (`max_inflight: 1000`) vs off: wrk -t1 -c16, closed
                   loop, short non-streaming chats, 3 mocks without delays, both gateways
                   on the same mocks, alternating, 3 rounds x 5 s (quick 2 x 2 s).

A config that `infergate --check` refuses (a binary from before the feature) is reported
"unsupported by this binary", its goals "n/a". Goals are informational: the exit status
is 0 unless --check is given, then 1 when a goal fails or cannot be evaluated. Writes
BASE.json and BASE.md (default load-tests/results/flow-control-<UTC>, with --quick
flow-control-quick-<UTC>). Absolute numbers from a shared 2-core machine hold for
nothing; the timings here are mostly the mocks' sleeps. Only the Python standard library.
"""
import argparse
import asyncio
import datetime
import hashlib
import http.client
import json
import os
import platform
import random
import re
import shutil
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engine_routing as er  # noqa: E402  (helpers: stats, HTTP, Prometheus text, Lab, Gateway, wrk)
import lab as lablib  # noqa: E402
from lab import BIN, HERE, cpu_seconds, fmt, goal  # noqa: E402

MODEL = "mock-model"
SCENARIOS = ["overload", "noisy-neighbour", "faults", "cost"]
POOL = "chat"
STOP = threading.Event()  # set on Ctrl-C / SIGTERM
KEY_A = "sk-flow-tenant-a-000000000000000000000"
KEY_B = "sk-flow-tenant-b-000000000000000000000"
# overload
OV_ENGINES, OV_SLOTS, OV_TTFT_MS, OV_MAX_WAIT_S = 3, 4, 150, 2
# noisy-neighbour: each request's service time comes from its `x-mock-prefill-us-per-token`
# header (the prompt "hi" is 2 tokens): B's fixed, A's spread uniformly around the same mean,
# so that the engines' slots free at random moments, not in lockstep
NN_ENGINES, NN_SLOTS, NN_SERVICE_MS, NN_MAX_WAIT_S = 4, 8, 400, 2
NN_A_SPREAD = 0.5  # A: uniform in [(1 - s), (1 + s)] x NN_SERVICE_MS
NN_MAX_LEN = 2000  # above what A's flood holds waiting (480/s x 2 s), so that only max_wait refuses
# faults
FA_ENGINE_ARGS = ["--ttft-ms", "20", "--tokens", "16", "--token-interval-ms", "10"]


def log(msg):
    print(f"[flow-control {time.strftime('%H:%M:%S')}] {msg}", flush=True)


pct, mean, med, ms = er.pct, er.mean, er.med, er.ms


def rnd(x, nd=2):
    return None if x is None else round(x, nd)


# ------------------------------------------------------------------ the async client
class Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    def close(self):
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001  (a socket already gone)
            pass


class AsyncPool:
    """Keep-alive connections to one address: an idle one is reused, else one is opened."""

    def __init__(self, addr):
        host, port = addr.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.idle = []
        self.opened = 0

    async def acquire(self):
        while self.idle:
            c = self.idle.pop()
            if not c.writer.is_closing() and not c.reader.at_eof():
                return c, True
            c.close()
        r, w = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        self.opened += 1
        return Conn(r, w), False

    def release(self, c):
        self.idle.append(c)

    def close_all(self):
        for c in self.idle:
            c.close()
        self.idle = []


def raw_request(addr, body, key=None, extra=()):
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n")
    if key:
        head += f"Authorization: Bearer {key}\r\n"
    for h in extra:
        head += h + "\r\n"
    return (head + "\r\n").encode() + body


class SSE:
    """Parses an event stream as it arrives (events end with a blank line)."""

    def __init__(self, rec, t0):
        self.rec, self.t0, self.buf = rec, t0, b""

    def feed(self, data):
        self.buf += data.replace(b"\r\n", b"\n")
        while b"\n\n" in self.buf:
            ev, self.buf = self.buf.split(b"\n\n", 1)
            for line in ev.split(b"\n"):
                if line.startswith(b":"):
                    self.rec["comments"] = self.rec.get("comments", 0) + 1
                elif line.startswith(b"data:"):
                    self.data(line[5:].strip())

    def data(self, payload):
        rec = self.rec
        if payload == b"[DONE]":
            rec["done"] = True
            return
        try:
            ev = json.loads(payload)
        except ValueError:
            rec["bad_event"] = payload[:200].decode(errors="replace")
            return
        if isinstance(ev, dict) and "error" in ev:
            err = ev["error"] if isinstance(ev["error"], dict) else {"message": str(ev["error"])}
            rec["sse_error"] = {"code": err.get("code"), "type": err.get("type"),
                                "message": str(err.get("message"))[:200]}
            rec["t_sse_error"] = time.monotonic() - self.t0
            return
        rec["events"] = rec.get("events", 0) + 1
        if rec.get("t_first") is None:
            for ch in ev.get("choices") or []:
                if (ch.get("delta") or {}).get("content"):
                    rec["t_first"] = time.monotonic() - self.t0
                    break


async def read_response(conn, rec, t0, stream):
    """Read one response: status line, headers, body (Content-Length, chunked or to EOF; SSE parsed
    as it arrives when `stream`). Returns whether the connection may be kept."""
    r = conn.reader
    line = await r.readline()
    if not line:
        raise EOFError("connection closed before the response")
    rec["t_head"] = time.monotonic() - t0
    parts = line.decode("latin-1").split(" ", 2)
    rec["status"] = int(parts[1])
    headers = {}
    while True:
        h = await r.readline()
        if not h:
            raise EOFError("connection closed in the response head")
        if h in (b"\r\n", b"\n"):
            break
        k, _, v = h.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("x-mock-instance"):
        rec["backend"] = headers["x-mock-instance"]
    if "retry-after" in headers:
        rec["retry_after"] = headers["retry-after"]
    if headers.get("x-infergate-fallback"):
        rec["fallback"] = headers["x-infergate-fallback"]
    sse = SSE(rec, t0) if stream and headers.get("content-type", "").startswith("text/event-stream") else None
    body = bytearray()
    keep = headers.get("connection", "").lower() != "close"

    def on_data(d):
        if sse is not None:
            sse.feed(d)
        elif rec["status"] != 200 or len(body) < 4096:
            body.extend(d)
    if "content-length" in headers:
        n = int(headers["content-length"])
        if n:
            on_data(await r.readexactly(n))
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            sz = await r.readline()
            if not sz:
                raise EOFError("connection closed in a chunked body")
            size = int(sz.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:
                    t = await r.readline()
                    if t in (b"\r\n", b"\n", b""):
                        break
                break
            d = await r.readexactly(size + 2)
            on_data(d[:-2])
    else:
        keep = False
        while True:
            d = await r.read(65536)
            if not d:
                break
            on_data(d)
    rec["t_end"] = time.monotonic() - t0
    if rec["status"] != 200 and body:
        try:
            err = json.loads(bytes(body)).get("error") or {}
            rec["code"] = err.get("code")
            rec["message"] = str(err.get("message"))[:300]
        except (ValueError, AttributeError):
            rec["message"] = bytes(body[:300]).decode(errors="replace")
    return keep


async def exchange(pool, req, rec, t0, stream):
    """One request on a pooled connection; one retry on a fresh connection when a
    kept-alive one turns out closed before any response byte."""
    for attempt in (0, 1):
        conn, reused = await pool.acquire()
        done = False
        try:
            rec["sent"] = time.monotonic() - t0
            conn.writer.write(req)
            await conn.writer.drain()
            try:
                keep = await read_response(conn, rec, t0, stream)
            except (EOFError, ConnectionError) as e:
                if reused and attempt == 0 and "t_head" not in rec:
                    rec["stale_retry"] = True
                    continue
                raise asyncio.IncompleteReadError(b"", None) from e
            done = True
            if keep:
                pool.release(conn)
            return
        except (ConnectionError, OSError) as e:
            if reused and attempt == 0 and "t_head" not in rec:
                rec["stale_retry"] = True
                continue
            rec["error"] = f"connection: {e!r}"[:200]
            rec["t_end"] = time.monotonic() - t0
            return
        except asyncio.IncompleteReadError as e:
            cause = e.__cause__ or e
            rec["error"] = ("cut before the response head" if "t_head" not in rec else
                            "cut mid-response") + f" ({type(cause).__name__})"
            rec["t_end"] = time.monotonic() - t0
            return
        finally:
            if not done:
                conn.close()


async def one_request(flow, i, due, t0, records, client_timeout):
    rec = {"i": i, "tenant": flow["name"], "due": due}
    records.append(rec)
    try:
        req = flow["request"]
        if isinstance(req, list):  # variants, in turn
            req = req[i % len(req)]
        await asyncio.wait_for(exchange(flow["pool"], req, rec, t0, flow.get("stream", False)),
                               client_timeout)
    except asyncio.TimeoutError:
        rec["error"] = f"client timeout ({client_timeout:g} s)"
        rec["t_end"] = time.monotonic() - t0
    except Exception as e:  # noqa: BLE001  (anything else is recorded, never lost)
        rec["error"] = f"client: {e!r}"[:200]
        rec["t_end"] = time.monotonic() - t0


async def drive(flows, duration, t0, client_timeout, label):
    """Open loop: each flow sends request k at t0 + k / rate until `duration`; every request is
    its own task. Then waits for the stragglers (bounded by the client timeout)."""
    records, tasks = [], set()
    lags = []

    async def gen(flow):
        k = 0
        loop = asyncio.get_running_loop()
        while not STOP.is_set():
            due = k / flow["rate"]
            if due >= duration:
                return
            delay = t0 + due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            lags.append(loop.time() - (t0 + due))
            t = asyncio.create_task(one_request(flow, k, due, t0, records, client_timeout))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            k += 1

    async def progress():
        last = 0
        while True:
            await asyncio.sleep(1)
            el = time.monotonic() - t0
            if el - last >= 10:
                last = el
                fin = [r for r in records if "t_end" in r]
                ok = sum(1 for r in fin if r.get("status") == 200 and not r.get("error") and not r.get("sse_error"))
                s503 = sum(1 for r in fin if r.get("status") == 503)
                errs = sum(1 for r in fin if r.get("error") or (r.get("status") not in (200, 503)))
                log(f"{label}: {el:5.0f} s: sent {len(records)}, done {len(fin)} (200 {ok}, 503 {s503}, "
                    f"other/errors {errs}), in flight {len(tasks)}")

    delay = t0 - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    prog = asyncio.create_task(progress())
    try:
        await asyncio.gather(*(gen(f) for f in flows))
        if tasks:
            await asyncio.wait(set(tasks), timeout=client_timeout + 5)
        left = len(tasks)
        for t in list(tasks):
            t.cancel()
        if left:
            await asyncio.wait(set(tasks), timeout=5)
    finally:
        prog.cancel()
        for f in flows:
            f["pool"].close_all()
    for r in records:
        if "t_end" not in r:
            r["error"] = r.get("error") or "cancelled at the end of the run"
    return records, {"lag_p99_ms": ms(pct(lags, 99)), "lag_max_ms": ms(max(lags, default=None)),
                     "connections_opened": sum(f["pool"].opened for f in flows)}


def run_load(flows, duration, client_timeout, label):
    """Run the open-loop flows on a fresh event loop; returns (records, client info, t0 monotonic)."""
    t0 = time.monotonic() + 0.2
    records, info = asyncio.run(drive(flows, duration, t0, client_timeout, label))
    return records, info, t0


# ------------------------------------------------------------------ processes
class Unsupported(Exception):
    pass


def spawn_mock(lab, name, listen, extra, instance):
    """A mock engine; `instance` is its x-mock-instance name (e0, e1, ...)."""
    return lab.spawn(name, [os.path.join(BIN, "mock-engine"), "--listen", listen, "--model", MODEL,
                            "--name", instance] + extra)


def wait_mock(lab, name, addr, p, timeout=15):
    deadline = time.time() + timeout
    while True:
        status, _ = er.http_get(addr, "/health", timeout=2)
        if status == 200:
            return
        if p.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"mock {name} on {addr} not healthy; see {lab.work}/{name}.err")
        time.sleep(0.05)


def start_mocks(lab, tag, n, extra):
    """[(name, addr, Popen)] once each answers /health."""
    out = []
    for i in range(n):
        name = f"{tag}-e{i}"
        p = spawn_mock(lab, name, "127.0.0.1:0", extra, f"e{i}")
        out.append([f"e{i}", lab.first_line(name, p, timeout=15), p])
    for name, addr, p in out:
        wait_mock(lab, f"{tag}-{name}", addr, p)
    return out


def gateway_yaml(backends, threads, pool_lines, keys_file=None, timeouts=None):
    lines = ["# written by load-tests/flow_control.py",
             f'server: {{ listen: "127.0.0.1:0", threads: {threads} }}']
    if timeouts:
        lines.append(f"timeouts: {{ {timeouts} }}")
    lines += ["pools:", f"  - name: {POOL}", f'    models: ["{MODEL}"]',
              "    backends: [" + ", ".join(f'"{b}"' for b in backends) + "]",
              "    balance: least_inflight"]
    lines += [f"    {x}" for x in pool_lines]
    if keys_file:
        lines += ["filters:", "  - request_id: {}", f"  - auth: {{ api_keys_file: {keys_file} }}"]
    return "\n".join(lines) + "\n"


def flow_lines(max_inflight=None, max_len=None, max_wait=None, extra=()):
    out = ["health_check: { interval: 1s }"]
    if max_inflight is not None:
        out.append(f"max_inflight: {max_inflight}")
        out.append(f"queue: {{ max_len: {max_len}, max_wait: {max_wait}, aging: 2s }}")
    return out + list(extra)


def write_keys(lab, name, tenants):
    """tenants: [(key, user, priority)]; keys stored hashed."""
    path = os.path.join(lab.work, f"{name}-keys.json")
    keys = [{"key": "sha256:" + hashlib.sha256(k.encode()).hexdigest(), "user": u, "priority": p, "weight": 1}
            for k, u, p in tenants]
    with open(path, "w") as f:
        json.dump({"keys": keys}, f)
    return path


def start_gateway(lab, name, backends, text):
    ok, msg = er.check_config(lab, name, text)
    if not ok:
        raise Unsupported("unsupported by this binary: " + er.check_errors(msg))
    p = lab.spawn(name, [os.path.join(BIN, "infergate"), "--config", os.path.join(lab.work, f"{name}.yaml")],
                  stop=signal.SIGINT)
    line = lab.first_line(name, p, timeout=30)
    prefix = "infergate listening on http://"
    if not line.startswith(prefix):
        raise RuntimeError(f"unexpected ready line from {name}: {line!r}")
    gw = er.Gateway(name, line[len(prefix):].rstrip("/"), p, text, os.path.join(lab.work, f"{name}.err"))
    er.wait_healthy(gw, backends, "least_inflight")
    return gw


def support(lab, args):
    """None when this binary accepts every flow-control key the benchmark uses, else why not."""
    text = gateway_yaml(["127.0.0.1:9", "127.0.0.1:10"], args.threads, flow_lines(
        4, 320, "2s", ["retries: 1", "retry_budget: 0.2",
                       "ejection: { enabled: true, consecutive_failures: 5, base_time: 1s, max_time: 10s, "
                       "max_ejected_percent: 50 }"]),
        keys_file=write_keys(lab, "support", [(KEY_A, "tenant-a", "high")]))
    ok, msg = er.check_config(lab, "support", text)
    return None if ok else "unsupported by this binary: " + er.check_errors(msg)


def mock_stats(engines):
    out = {}
    for name, addr, _ in engines:
        status, data = er.http_get(addr, "/mock/stats")
        try:
            out[name] = json.loads(data) if status == 200 else {"error": data.decode(errors="replace")[:200]}
        except ValueError:
            out[name] = {"error": "not JSON"}
    return out


def gateway_counters(samples, names=None):
    """The flow-control families of a /metrics scrape (backends named by `names`: addr -> name)."""
    names = names or {}
    out = {"queue_requests": {}, "retries": {}, "retry_budget_exhausted": 0, "ejections": {},
           "ejected_now": {}, "queue_length": None, "fallbacks": 0}
    for n, lb, v in samples:
        if n == "infergate_queue_requests_total":
            out["queue_requests"][lb.get("outcome", "?")] = int(v)
        elif n == "infergate_retries_total":
            out["retries"][lb.get("reason", "?")] = int(v)
        elif n == "infergate_retry_budget_exhausted_total":
            out["retry_budget_exhausted"] += int(v)
        elif n == "infergate_backend_ejections_total":
            out["ejections"][names.get(lb.get("backend"), lb.get("backend", "?"))] = int(v)
        elif n == "infergate_backend_ejected":
            out["ejected_now"][names.get(lb.get("backend"), lb.get("backend", "?"))] = int(v)
        elif n == "infergate_queue_length":
            out["queue_length"] = int(v)
        elif n == "infergate_fallbacks_total":
            out["fallbacks"] += int(v)
    return out


class Sampler(threading.Thread):
    """Polls the gateway while a run goes on: /metrics queue length every `every` s, and
    (with services=True) GET /services every 50 ms, keeping each backend's `ejected` and
    `healthy` transitions with their time (s since t0)."""

    def __init__(self, addr, t0, names, services=False, every=1.0):
        super().__init__(daemon=True)
        self.addr, self.t0, self.names, self.services, self.every = addr, t0, names, services, every
        self.halt = threading.Event()
        self.queue_len = []
        self.transitions = []  # (t, backend name, field, value)
        self.state = {}

    def run(self):
        next_scrape = 0.0
        while not self.halt.is_set() and not STOP.is_set():
            now = time.monotonic()
            if now >= next_scrape:
                next_scrape = now + self.every
                for n, lb, v in er.scrape(self.addr):
                    if n == "infergate_queue_length" and lb.get("pool") == POOL:
                        self.queue_len.append(v)
            if self.services:
                self.poll_services()
            self.halt.wait(0.05 if self.services else self.every)

    def poll_services(self):
        status, data = er.http_get(self.addr, "/services", timeout=2)
        if status != 200:
            return
        t = time.monotonic() - self.t0
        try:
            services = json.loads(data).get("services", [])
        except ValueError:
            return
        for s in services:
            name = self.names.get(s.get("url", "").replace("http://", ""), s.get("url"))
            for field in ("ejected", "healthy"):
                v = s.get(field)
                if self.state.get((name, field)) != v:
                    self.state[(name, field)] = v
                    self.transitions.append((round(t, 3), name, field, v))

    def stop(self):
        self.halt.set()
        self.join(5)


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def log_findings(gw, names=None):
    """WARN/ERROR lines of the gateway's log (as engine_routing.py's, but request ids masked and
    backend addresses named, so that one kind of line is counted once)."""
    kinds = {}
    try:
        with open(gw.err_path, errors="replace") as f:
            for ln in f:
                if not (" WARN " in ln or " ERROR " in ln or "panick" in ln) or "NVML" in ln:
                    continue
                m = er.LOG_LINE.match(ln.strip())
                key = f"{m.group(1)} {m.group(2)}: {m.group(3)}" if m else ln.strip()
                key = UUID.sub("<id>", key)
                for addr, n in (names or {}).items():
                    key = key.replace(addr, n)
                kinds[key[:300]] = kinds.get(key[:300], 0) + 1
    except OSError:
        pass
    return {"count": sum(kinds.values()), "kinds": kinds}


NUMBER = re.compile(r"\d+\.\d+")


def log_kinds(findings):
    """The distinct log lines, decimal figures (waits, durations) masked so that one kind counts once."""
    kinds = {}
    for k, n in findings["kinds"].items():
        k = NUMBER.sub("N", k)
        kinds[k] = kinds.get(k, 0) + n
    return "; ".join(f"{n} x `{k[:200]}`" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:6])


# ------------------------------------------------------------------ classification
def is_ok(r):
    if r.get("error") or r.get("status") != 200 or r.get("sse_error"):
        return False
    return r.get("done", True)


def refusal_kind(r):
    """'max_len' / 'shed' (refused at once: it would wait past max_wait) / 'max_wait' (waited it) /
    'other' for a 503 server_overloaded, from its message."""
    m = r.get("message") or ""
    if "would wait" in m:
        return "shed"
    if "queue.max_len" in m:
        return "max_len"
    if "queue.max_wait" in m:
        return "max_wait"
    return "other"


def valid_refusal(r):
    ra = r.get("retry_after")
    try:
        ra_ok = ra is not None and int(ra) >= 1
    except ValueError:
        ra_ok = False
    return r.get("status") == 503 and r.get("code") == "server_overloaded" and ra_ok


def error_text(r):
    if r.get("error"):
        return r["error"]
    if r.get("sse_error"):
        return f"stream error event {r['sse_error'].get('code')}: {r['sse_error'].get('message')}"
    if r.get("status") != 200:
        return f"HTTP {r.get('status')} {r.get('code')}: {(r.get('message') or '')[:120]}"
    if not r.get("done", True):
        return "stream ended without [DONE]"
    return "?"


def first_errors(rs, n=6):
    kinds = {}
    for r in rs:
        k = error_text(r)
        kinds[k] = kinds.get(k, 0) + 1
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1])[:n])


def summarize(records, window, tenant=None):
    """Figures of one flow (or all) over the measurement window (a, b) in s since t0:
    latency and refusal figures for requests due in the window, served rate by completion
    time in the window."""
    a, b = window
    rs = [r for r in records if tenant is None or r["tenant"] == tenant]
    due = [r for r in rs if a <= r["due"] < b]
    ok = [r for r in due if is_ok(r)]
    served_in = sum(1 for r in rs if is_ok(r) and a <= r["t_end"] < b)
    refused = [r for r in due if r.get("status") == 503 and r.get("code") == "server_overloaded"]
    other = [r for r in due if not is_ok(r) and r not in refused]
    lat = [r["t_end"] - r["sent"] for r in ok]
    ref_t = [r["t_end"] - r["sent"] for r in refused]
    kinds = {}
    for r in refused:
        kinds[refusal_kind(r)] = kinds.get(refusal_kind(r), 0) + 1
    ras = sorted(int(r["retry_after"]) for r in refused if str(r.get("retry_after", "")).isdigit())
    return {
        "sent": len(rs), "due_in_window": len(due), "window_s": [round(a, 2), round(b, 2)],
        "offered_rps": rnd(len(due) / (b - a), 1), "served_rps": rnd(served_in / (b - a), 2),
        "ok": len(ok), "ok_total": sum(1 for r in rs if is_ok(r)),
        "latency_ms": {"p50": ms(pct(lat, 50)), "p90": ms(pct(lat, 90)), "p99": ms(pct(lat, 99)),
                       "max": ms(max(lat, default=None)), "mean": ms(mean(lat))},
        "refused": len(refused), "refused_valid": sum(1 for r in refused if valid_refusal(r)),
        "refused_by": kinds,
        "time_to_503_ms": {"p50": ms(pct(ref_t, 50)), "p99": ms(pct(ref_t, 99)), "max": ms(max(ref_t, default=None))},
        "retry_after_s": {"min": ras[0], "p50": pct(ras, 50), "max": ras[-1]} if ras else None,
        "other_errors": len(other), "other_errors_kinds": first_errors(other),
        "stale_retries": sum(1 for r in due if r.get("stale_retry")),
    }


# ------------------------------------------------------------------ (1) overload
def overload(lab, args, unsupported):
    cap = OV_ENGINES * OV_SLOTS / (OV_TTFT_MS / 1000)
    dur = args.duration or (20 if args.quick else 120)
    warm = 5 if args.quick else 10
    max_len = int(2 * cap * OV_MAX_WAIT_S)
    p = {"engines": OV_ENGINES, "engine_args": f"--max-running {OV_SLOTS} --ttft-ms {OV_TTFT_MS}",
         "request": "non-streaming chat (a non-streamed answer takes the TTFT)",
         "capacity_rps": cap, "offered_rps": 2 * cap, "duration_s": dur, "warmup_s": warm,
         "client_timeout_s": args.client_timeout, "max_inflight": OV_SLOTS,
         "queue": {"max_len": max_len, "max_wait_s": OV_MAX_WAIT_S}, "rounds": args.rounds}
    out = {"params": p, "runs": {}}
    if unsupported:
        out["runs"] = {"with-queue": {"unsupported": unsupported}, "without-queue": {"skipped": "n/a"}}
        return out
    log(f"overload: capacity {cap:.0f} req/s (3 x 4 slots / {OV_TTFT_MS} ms), offering {2 * cap:.0f} req/s "
        f"for {dur} s, with and without the queue (max_len {max_len}, max_wait {OV_MAX_WAIT_S}s), "
        f"{args.rounds} round(s)")
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}).encode()
    runs = {"with-queue": [], "without-queue": []}
    order = list(runs)
    for rd in range(args.rounds):
        for name in (order if rd % 2 == 0 else order[::-1]):
            if STOP.is_set():
                raise KeyboardInterrupt
            tag = f"ov-{'q' if name == 'with-queue' else 'noq'}-r{rd}"
            engines = start_mocks(lab, tag, OV_ENGINES, ["--max-running", str(OV_SLOTS), "--ttft-ms", str(OV_TTFT_MS)])
            procs = [e[2] for e in engines]
            try:
                backends = [a for _, a, _ in engines]
                pl = flow_lines(OV_SLOTS, max_len, f"{OV_MAX_WAIT_S}s") if name == "with-queue" else flow_lines()
                gw = start_gateway(lab, f"{tag}-gw", backends, gateway_yaml(
                    backends, args.threads, pl, timeouts="first_byte: 60s"))
                procs.append(gw.proc)
                flows = [{"name": "client", "rate": 2 * cap, "pool": AsyncPool(gw.addr),
                          "request": raw_request(gw.addr, body)}]
                log(f"{tag}: gateway {gw.addr}, {name}")
                cpu0 = cpu_seconds([gw.proc.pid])
                sampler = Sampler(gw.addr, time.monotonic(), {})
                sampler.start()
                try:
                    records, client, t0 = run_load(flows, dur, args.client_timeout, tag)
                finally:
                    sampler.stop()
                cpu1 = cpu_seconds([gw.proc.pid])
                stats = mock_stats(engines)
                if gw.proc.poll() is not None:
                    raise RuntimeError(f"{gw.name} exited during the run; see {gw.err_path}")
                s = summarize(records, (warm, dur))
                s.update({
                    "served_over_capacity": rnd(s["served_rps"] / cap, 4),
                    "engines": {n: {k: st.get(k) for k in ("requests", "completed", "cancelled", "max_active",
                                                          "max_queued", "started")} for n, st in stats.items()},
                    "engine_max_active": max((st.get("max_active") or 0) for st in stats.values()),
                    "engine_max_queued": max((st.get("max_queued") or 0) for st in stats.values()),
                    "gateway": gateway_counters(er.scrape(gw.addr)),
                    "gateway_queue_length_max": int(max(sampler.queue_len, default=0)),
                    "gateway_queue_length_mean": rnd(mean(sampler.queue_len), 1),
                    "gateway_cpu_s": round(cpu1 - cpu0, 2), "gateway_log": log_findings(gw), "client": client,
                    "round": rd})
                runs[name].append(s)
                log(f"{tag}: served {s['served_rps']} req/s ({s['served_over_capacity']} x capacity), "
                    f"latency p50/p99 {s['latency_ms']['p50']}/{s['latency_ms']['p99']} ms, refused {s['refused']} "
                    f"({s['refused_by']}, {s['refused_valid']} valid, time to 503 p50/p99 "
                    f"{s['time_to_503_ms']['p50']}/{s['time_to_503_ms']['p99']} ms), other errors "
                    f"{s['other_errors']} {s['other_errors_kinds']}; engines max_active {s['engine_max_active']} "
                    f"max_queued {s['engine_max_queued']}; client lag p99 {client['lag_p99_ms']} ms")
            except Unsupported as e:
                runs[name].append({"unsupported": str(e)})
                log(f"{tag}: {e}")
            finally:
                lab.stop_some(procs)
    out["runs"] = {k: combine(v) for k, v in runs.items()}
    return out


# ------------------------------------------------------------------ rounds
SUM_KEYS = {"sent", "due_in_window", "ok", "ok_total", "refused", "refused_valid", "other_errors", "stale_retries",
            "requests", "completed", "cancelled", "started", "count", "accounted", "unaccounted", "errors",
            "retry_budget_exhausted", "fallbacks", "client_errors_during"}
SUM_DICTS = {"refused_by", "other_errors_kinds", "queue_requests", "retries", "ejections", "kinds",
             "accounted_kinds", "unaccounted_kinds", "per_backend_client"}


def combine(rs):
    """One round: as it is. More: medians of figures, sums of counts, maxima of max_* (the
    rounds themselves under "rounds")."""
    rs = [r for r in rs if r]
    if not rs:
        return {}
    if any("unsupported" in r for r in rs):
        return next(r for r in rs if "unsupported" in r)
    if len(rs) == 1:
        return rs[0]

    def merge(key, vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return None
        v0 = vals[0]
        if isinstance(v0, bool):
            return all(vals)
        if isinstance(v0, (int, float)):
            if key in SUM_KEYS:
                return sum(vals)
            if "max" in key.split("_") or key.startswith("max"):
                return max(vals)
            m = med(vals)
            return int(m) if all(isinstance(v, int) for v in vals) and m == int(m) else m
        if isinstance(v0, dict):
            keys = []
            for v in vals:
                keys += [k for k in v if k not in keys]
            if key in SUM_DICTS:
                return {k: sum((v.get(k) or 0) for v in vals) for k in keys}
            return {k: merge(k, [v.get(k) for v in vals]) for k in keys}
        return v0  # lists, strings: the first round's (every round is under "rounds")
    out = {k: merge(k, [r.get(k) for r in rs]) for k in rs[0]}
    out["rounds_n"] = len(rs)
    out["rounds"] = rs
    return out


# ------------------------------------------------------------------ (2) noisy neighbour
def noisy_neighbour(lab, args, unsupported):
    cap = NN_ENGINES * NN_SLOTS / (NN_SERVICE_MS / 1000)
    secs = args.phase_seconds or (10 if args.quick else 30)
    warm = 3 if args.quick else 5
    light_b, heavy_b = 0.25 * cap, 0.6 * cap
    w = NN_MAX_WAIT_S
    phases = [
        # name, A rate, B rate, B priority, queue max_len, queue max_wait (s)
        ("b-alone", 0, light_b, "normal", NN_MAX_LEN, w),
        ("a+b", 10 * light_b, light_b, "normal", NN_MAX_LEN, w),
        ("a+b-high", 10 * light_b, light_b, "high", NN_MAX_LEN, w),
        ("backlogged", 10 * heavy_b, heavy_b, "normal", NN_MAX_LEN, w),
        ("a+b-small-queue", 10 * light_b, light_b, "normal", 40, w),
        ("a+b-wait-6s", 10 * light_b, light_b, "normal", NN_MAX_LEN, 6),
    ]
    lo, hi = (1 - NN_A_SPREAD) * NN_SERVICE_MS, (1 + NN_A_SPREAD) * NN_SERVICE_MS
    p = {"engines": NN_ENGINES, "engine_args": f"--max-running {NN_SLOTS} --ttft-ms 0",
         "request": f"non-streaming chat; service time per request from `x-mock-prefill-us-per-token` (the prompt is "
                    f"2 tokens): B {NN_SERVICE_MS} ms, A uniform {lo:g}-{hi:g} ms",
         "service_ms": NN_SERVICE_MS, "a_service_ms": [lo, hi], "capacity_rps": cap, "phase_s": secs, "warmup_s": warm,
         "max_inflight": NN_SLOTS, "queue": {"max_len": NN_MAX_LEN, "max_wait_s": NN_MAX_WAIT_S, "aging_s": 2},
         "client_timeout_s": args.client_timeout, "rounds": args.rounds,
         "phases": [{"phase": n, "a_rps": a, "b_rps": b, "b_priority": pr, "max_len": ml, "max_wait_s": mw}
                    for n, a, b, pr, ml, mw in phases]}
    out = {"params": p, "phases": {}}
    if unsupported:
        out["phases"] = {n: {"unsupported": unsupported} for n, *_ in phases}
        return out
    log(f"noisy-neighbour: capacity {cap:.0f} req/s; phases of {secs} s: " +
        ", ".join(f"{n} (A {a:.0f}/s, B {b:.0f}/s {pr}, max_len {ml}, max_wait {mw}s)"
                  for n, a, b, pr, ml, mw in phases))
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}).encode()
    runs = {n: [] for n, *_ in phases}
    for rd in range(args.rounds):
        for name, a_rate, b_rate, b_prio, max_len, max_wait in phases:
            if STOP.is_set():
                raise KeyboardInterrupt
            tag = f"nn-{name.replace('+', '')}-r{rd}"
            engines = start_mocks(lab, tag, NN_ENGINES, ["--max-running", str(NN_SLOTS), "--ttft-ms", "0"])
            procs = [e[2] for e in engines]
            try:
                backends = [a for _, a, _ in engines]
                keys = write_keys(lab, tag, [(KEY_A, "tenant-a", "normal"), (KEY_B, "tenant-b", b_prio)])
                gw = start_gateway(lab, f"{tag}-gw", backends, gateway_yaml(
                    backends, args.threads, flow_lines(NN_SLOTS, max_len, f"{max_wait}s"), keys_file=keys,
                    timeouts="first_byte: 60s"))
                procs.append(gw.proc)
                flows = []
                rng = random.Random(f"nn-{rd}")
                if a_rate:
                    flows.append({"name": "A", "rate": a_rate, "pool": AsyncPool(gw.addr), "request": [
                        raw_request(gw.addr, body, KEY_A, [f"x-mock-prefill-us-per-token: {us}"])
                        for us in (int(rng.uniform(lo, hi) * 500) for _ in range(97))]})
                flows.append({"name": "B", "rate": b_rate, "pool": AsyncPool(gw.addr), "request": raw_request(
                    gw.addr, body, KEY_B, [f"x-mock-prefill-us-per-token: {NN_SERVICE_MS * 500}"])})
                log(f"{tag}: gateway {gw.addr}; A {a_rate:.0f}/s, B {b_rate:.0f}/s ({b_prio}), max_len {max_len}, max_wait {max_wait}s")
                records, client, t0 = run_load(flows, secs, args.client_timeout, tag)
                stats = mock_stats(engines)
                if gw.proc.poll() is not None:
                    raise RuntimeError(f"{gw.name} exited during the run; see {gw.err_path}")
                x = {"A": summarize(records, (warm, secs), "A") if a_rate else None,
                     "B": summarize(records, (warm, secs), "B"),
                     "engine_max_active": max((st.get("max_active") or 0) for st in stats.values()),
                     "engine_max_queued": max((st.get("max_queued") or 0) for st in stats.values()),
                     "gateway": gateway_counters(er.scrape(gw.addr)), "gateway_log": log_findings(gw),
                     "client": client, "round": rd}
                if a_rate:
                    ra, rb = x["A"]["served_rps"], x["B"]["served_rps"]
                    x["a_over_b"] = rnd(ra / rb, 3) if rb else None
                    x["jain"] = rnd((ra + rb) ** 2 / (2 * (ra * ra + rb * rb)), 4) if ra or rb else None
                runs[name].append(x)
                B = x["B"]
                log(f"{tag}: B p50/p99 {B['latency_ms']['p50']}/{B['latency_ms']['p99']} ms, served B "
                    f"{B['served_rps']}/s" + (f", A {x['A']['served_rps']}/s (A:B {x['a_over_b']}, Jain {x['jain']})"
                                              if a_rate else "")
                    + f"; refused B {B['refused']} {B['refused_by']}" +
                    (f", A {x['A']['refused']} {x['A']['refused_by']}" if a_rate else "") +
                    f"; other errors B {B['other_errors']}" + (f", A {x['A']['other_errors']}" if a_rate else "")
                    + f"; client lag p99 {client['lag_p99_ms']} ms")
            except Unsupported as e:
                runs[name].append({"unsupported": str(e)})
                log(f"{tag}: {e}")
            finally:
                lab.stop_some(procs)
    out["phases"] = {n: combine(v) for n, v in runs.items()}
    return out


# ------------------------------------------------------------------ (3) faults
class Faults(threading.Thread):
    """The fault schedule, at fixed offsets from t0 (s): kill e0 + restart on its port, reset
    on e1, 503 on e2. Each action's actual time is recorded."""

    def __init__(self, lab, tag, engines, t0, dur, fault_len):
        super().__init__(daemon=True)
        self.lab, self.tag, self.engines, self.t0 = lab, tag, engines, t0
        phase = dur / 4
        self.plan = [(0.5 * phase, "kill", 0), (0.5 * phase + fault_len, "restart", 0),
                     (1.5 * phase, "reset-on", 1), (1.5 * phase + fault_len, "reset-off", 1),
                     (2.5 * phase, "503-on", 2), (2.5 * phase + fault_len, "503-off", 2)]
        self.done = []  # (planned s, actual s, action, engine, ok, detail)
        self.errors = []

    def run(self):
        for at, action, i in self.plan:
            while not STOP.is_set():
                left = self.t0 + at - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(left, 0.1))
            if STOP.is_set():
                return
            t = time.monotonic() - self.t0
            try:
                detail = self.act(action, i)
                self.done.append({"planned_s": round(at, 2), "at_s": round(t, 3), "action": action,
                                  "engine": self.engines[i][0], "ok": True, "detail": detail})
            except Exception as e:  # noqa: BLE001  (recorded and reported)
                self.done.append({"planned_s": round(at, 2), "at_s": round(t, 3), "action": action,
                                  "engine": self.engines[i][0], "ok": False, "detail": repr(e)[:200]})
                self.errors.append(f"{action} {self.engines[i][0]}: {e!r}")

    def act(self, action, i):
        name, addr, proc = self.engines[i]
        if action == "kill":
            proc.kill()
            proc.wait(5)
            return f"SIGKILL pid {proc.pid}"
        if action == "restart":
            deadline = time.time() + 10
            n = 0
            while True:  # the port may take a moment to be free again
                n += 1
                p = spawn_mock(self.lab, f"{self.tag}-{name}-restart{n}", addr, FA_ENGINE_ARGS, name)
                try:
                    self.lab.first_line(f"{self.tag}-{name}-restart{n}", p, timeout=5)
                    wait_mock(self.lab, f"{self.tag}-{name}-restart{n}", addr, p, timeout=5)
                    break
                except RuntimeError:
                    if p.poll() is None:
                        p.kill()
                    if time.time() > deadline:
                        raise
                    time.sleep(0.2)
            self.engines[i][2] = p
            return f"restarted on {addr} (pid {p.pid}, attempt {n})"
        body = {"reset-on": {"reset": True}, "reset-off": {"reset": False},
                "503-on": {"fail_status": 503}, "503-off": {"fail_status": None}}[action]
        status, data = http_post(addr, "/mock/fault", json.dumps(body).encode())
        if status != 200:
            raise RuntimeError(f"POST /mock/fault {body}: {status} {data[:200]!r}")
        return f"POST /mock/fault {json.dumps(body)}"


def http_post(addr, path, body, timeout=5.0):
    host, port = addr.rsplit(":", 1)
    try:
        c = http.client.HTTPConnection(host, int(port), timeout=timeout)
        c.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, data
    except (OSError, http.client.HTTPException) as e:
        return None, str(e).encode()


def faults(lab, args, unsupported):
    dur = args.faults_seconds or (15 if args.quick else 45)
    fault_len = 2 if args.quick else 3
    rate = args.faults_rate
    p = {"engines": 3, "engine_args": " ".join(FA_ENGINE_ARGS), "request": "streaming chat", "rate_rps": rate,
         "duration_s": dur, "fault_s": fault_len, "client_timeout_s": args.client_timeout,
         "gateway": "max_inflight 16, queue {max_len 1000, max_wait 5s}, retries 1, retry_budget 0.2, ejection "
                    "{consecutive_failures 5, base_time 1s, max_time 10s, max_ejected_percent 50}, health checks "
                    "every 1s (timeout 500ms), timeouts connect 1s / first_byte 5s / idle 5s",
         "faults": "e0 SIGKILL then restarted on its port; e1 /mock/fault reset (connection closed before the "
                   "response head); e2 /mock/fault fail_status 503; one at a time, each for fault_s",
         "rounds": args.rounds}
    out = {"params": p}
    if unsupported:
        out["unsupported"] = unsupported
        return out
    body = json.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    runs = []
    for rd in range(args.rounds):
        if STOP.is_set():
            raise KeyboardInterrupt
        tag = f"fa-r{rd}"
        engines = start_mocks(lab, tag, 3, FA_ENGINE_ARGS)
        procs = [e[2] for e in engines]
        gw = None
        try:
            backends = [a for _, a, _ in engines]
            names = {a: n for n, a, _ in engines}
            pl = ["health_check: { interval: 1s, timeout: 500ms }", "max_inflight: 16",
                  "queue: { max_len: 1000, max_wait: 5s }", "retries: 1", "retry_budget: 0.2",
                  "ejection: { enabled: true, consecutive_failures: 5, base_time: 1s, max_time: 10s, "
                  "max_ejected_percent: 50 }"]
            gw = start_gateway(lab, f"{tag}-gw", backends, gateway_yaml(
                backends, args.threads, pl, timeouts="connect: 1s, first_byte: 5s, idle: 5s"))
            procs.append(gw.proc)
            log(f"{tag}: gateway {gw.addr}; streaming at {rate}/s for {dur} s; faults of {fault_len} s: "
                f"kill+restart e0, reset e1, 503 e2")
            flows = [{"name": "client", "rate": rate, "pool": AsyncPool(gw.addr), "stream": True,
                      "request": raw_request(gw.addr, body)}]
            t0 = time.monotonic() + 0.2
            fth = Faults(lab, tag, engines, t0, dur, fault_len)
            sampler = Sampler(gw.addr, t0, names, services=True)
            fth.start()
            sampler.start()
            try:
                records, client = asyncio.run(drive(flows, dur, t0, args.client_timeout, tag))
            finally:
                fth.join(15)
                sampler.stop()
            procs = [e[2] for e in engines] + [gw.proc]  # the restarted e0 included
            # afterwards: a trickle of requests; every backend must take traffic again
            back = recovery(gw, engines, names, body)
            x = faults_figures(records, fth, sampler, engines, gw, back, names)  # scrapes /metrics
            # then: a half-open probe whose client leaves before the response head
            abandoned = probe_abandoned(gw, engines, names)
            x.update(client=client, round=rd, probe_abandoned=abandoned)
            runs.append(x)
            log(f"{tag}: abandoned half-open probe: {abandoned}")
            log(f"{tag}: {x['requests']} requests, {x['ok']} ok, {x['accounted']} accounted errors, "
                f"{x['unaccounted']} unaccounted {x['unaccounted_kinds']}; retries {x['gateway']['retries']} "
                f"(budget refused {x['gateway']['retry_budget_exhausted']}); ejections "
                f"{x['gateway']['ejections']}; after: {x['recovery']}")
        except Unsupported as e:
            runs.append({"unsupported": str(e)})
            log(f"{tag}: {e}")
        finally:
            lab.stop_some([e[2] for e in engines] + ([gw.proc] if gw else []) + procs)
    if len(runs) == 1:
        out.update(runs[0])
    else:
        out.update(combine(runs))
    return out


def services_state(gw, names):
    status, data = er.http_get(gw.addr, "/services", timeout=2)
    if status != 200:
        return {}
    try:
        return {names.get(s["url"].replace("http://", ""), s["url"]):
                {"ejected": s.get("ejected"), "healthy": s.get("healthy"),
                 "ejected_for_seconds": rnd(s.get("ejected_for_seconds"), 2), "ejections": s.get("ejections")}
                for s in json.loads(data).get("services", [])}
    except (ValueError, KeyError):
        return {}


def post_chat(gw, body, headers=None, timeout=5.0):
    """(status, x-mock-instance) of one non-streaming chat, (None, error) when the client gave up."""
    host, port = gw.addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        c.request("POST", "/v1/chat/completions", body=body,
                  headers={"Content-Type": "application/json", **(headers or {})})
        r = c.getresponse()
        r.read()
        return r.status, r.getheader("x-mock-instance")
    except (OSError, http.client.HTTPException) as e:
        return None, repr(e)[:100]
    finally:
        c.close()


def probe_abandoned(gw, engines, names):
    """A backend in half-open whose probe request's client leaves before the response head:
    does it come back? e2 answers 503 until ejected, then is healed; once its ejection time is
    over (half-open), slow requests (2 s to the head, from `x-mock-prefill-us-per-token`) whose
    clients give up after 0.3 s are sent until one reached e2 (its probe); then up to 10 s of
    ordinary requests: e2 must be back in rotation (not ejected, serving)."""
    name, addr, _ = engines[2]
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}).encode()
    out = {"engine": name, "ejected": False, "half_open": False, "probe_sent": False, "back": False}

    def e_requests():
        st, d = er.http_get(addr, "/mock/stats")
        try:
            return json.loads(d)["requests"] if st == 200 else None
        except (ValueError, KeyError):
            return None
    try:
        http_post(addr, "/mock/fault", b'{"fail_status": 503}')
        for _ in range(60):
            post_chat(gw, body)
            if services_state(gw, names).get(name, {}).get("ejected"):
                out["ejected"] = True
                break
    finally:
        http_post(addr, "/mock/fault", b'{"fail_status": null}')
    if not out["ejected"]:
        return out
    deadline = time.time() + 15
    while time.time() < deadline and not STOP.is_set():
        st = services_state(gw, names).get(name, {})
        if st.get("ejected") and not st.get("ejected_for_seconds"):
            out["half_open"] = True
            break
        time.sleep(0.05)
    if not out["half_open"]:
        return out
    slow = {"x-mock-prefill-us-per-token": "1000000"}
    for _ in range(5):
        before = e_requests()
        threads = [threading.Thread(target=post_chat, args=(gw, body, slow, 0.3)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        time.sleep(0.1)
        if before is not None and (e_requests() or 0) > before:
            out["probe_sent"] = True
            break
    time.sleep(2.2)  # the slow requests are over at the engine
    served, deadline, n = {}, time.time() + 10, 0
    while time.time() < deadline and not STOP.is_set():
        st, who = post_chat(gw, body)
        n += 1
        served[who] = served.get(who, 0) + 1
        state = services_state(gw, names).get(name, {})
        if served.get(name) and state.get("ejected") is False:
            out["back"] = True
            break
        time.sleep(0.05)
    out.update(requests_after=n, served_after=served, services=services_state(gw, names).get(name))
    return out


def recovery(gw, engines, names, body, timeout=20):
    """After the load: up to `timeout` s of sequential requests (20/s) until every backend is
    healthy, not ejected, and has served a request since; what /services says at the end."""
    deadline = time.time() + timeout
    seen = set()
    host, port = gw.addr.rsplit(":", 1)
    n = 0
    state = {}
    while time.time() < deadline and not STOP.is_set():
        try:
            c = http.client.HTTPConnection(host, int(port), timeout=5)
            c.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            b = r.read()
            c.close()
            n += 1
            if r.status == 200 and b"[DONE]" in b and r.getheader("x-mock-instance"):
                seen.add(r.getheader("x-mock-instance"))
        except (OSError, http.client.HTTPException):
            pass
        status, data = er.http_get(gw.addr, "/services", timeout=2)
        if status == 200:
            try:
                state = {names.get(s["url"].replace("http://", ""), s["url"]):
                         {"ejected": s.get("ejected"), "healthy": s.get("healthy"),
                          "ejected_for_seconds": rnd(s.get("ejected_for_seconds"), 2), "ejections": s.get("ejections")}
                         for s in json.loads(data).get("services", [])}
            except (ValueError, KeyError):
                pass
        if state and all(v["healthy"] and not v["ejected"] for v in state.values()) and \
                all(n_ in seen for n_, _, _ in engines):
            break
        time.sleep(0.05)
    ok = bool(state) and all(v["healthy"] and not v["ejected"] for v in state.values()) and \
        all(e[0] in seen for e in engines)
    return {"all_back": ok, "requests": n, "served_by": sorted(seen), "services": state,
            "waited_s": rnd(timeout - max(0.0, deadline - time.time()), 2)}


def faults_figures(records, fth, sampler, engines, gw, back, names):
    acts = {f["action"]: f for f in fth.done}
    kill_t = acts.get("kill", {}).get("at_s")
    killed = engines[0][0]
    accounted, unaccounted = [], []
    for r in records:
        if is_ok(r):
            continue
        started = r.get("status") == 200 and r.get("t_head") is not None
        on_killed = r.get("backend") == killed
        in_flight = kill_t is not None and r.get("sent", 1e9) <= kill_t <= r.get("t_end", 0) + 0.05
        if started and on_killed and in_flight and r.get("sse_error") and not r.get("error"):
            accounted.append(r)
        else:
            unaccounted.append(r)
    ok = [r for r in records if is_ok(r)]
    lat = [r["t_end"] - r["sent"] for r in ok]
    ttft = [r["t_first"] - r["sent"] for r in ok if r.get("t_first") is not None]
    # ejection / health timeline per fault
    timeline = []
    spans = [("kill", "restart", 0), ("reset-on", "reset-off", 1), ("503-on", "503-off", 2)]
    for start, end, i in spans:
        name = engines[i][0]
        a = acts.get(start, {}).get("at_s")
        b = acts.get(end, {}).get("at_s")
        tr = [t for t in sampler.transitions if t[1] == name]

        def first(field, value, after, _tr=tr):
            return next((t for t, _n, f, v in _tr if f == field and v == value and after is not None and t >= after),
                        None)
        ej = first("ejected", True, a)
        back_in = first("ejected", False, ej) if ej is not None else None
        unh = first("healthy", False, a)
        heal = first("healthy", True, unh) if unh is not None else None
        errs_here = [r for r in records if not is_ok(r) and a is not None and
                     r.get("sent", 1e9) <= (b or 1e9) + 1 and r.get("t_end", 0) >= a]
        timeline.append({"fault": start.replace("-on", ""), "engine": name, "start_s": a, "end_s": b,
                         "ejected_after_s": rnd(ej - a, 3) if ej is not None else None,
                         "back_in_rotation_s": rnd(back_in - a, 3) if back_in is not None else None,
                         "unhealthy_after_s": rnd(unh - a, 3) if unh is not None else None,
                         "healthy_again_s": rnd(heal - a, 3) if heal is not None else None,
                         "client_errors_during": len(errs_here)})
    samples = er.scrape(gw.addr)
    return {
        "requests": len(records), "ok": len(ok), "errors": len(records) - len(ok),
        "accounted": len(accounted), "unaccounted": len(unaccounted),
        "unaccounted_kinds": first_errors(unaccounted),
        "unaccounted_first": [{k: r.get(k) for k in ("sent", "t_head", "t_end", "status", "backend", "error",
                                                     "sse_error", "code", "message", "done", "events")}
                              for r in unaccounted[:8]],
        "accounted_kinds": first_errors(accounted),
        "latency_ms": {"p50": ms(pct(lat, 50)), "p99": ms(pct(lat, 99)), "max": ms(max(lat, default=None))},
        "ttft_ms": {"p50": ms(pct(ttft, 50)), "p99": ms(pct(ttft, 99))},
        "stale_retries": sum(1 for r in records if r.get("stale_retry")),
        "faults": fth.done, "fault_errors": fth.errors, "timeline": timeline,
        "transitions": sampler.transitions,
        "gateway": gateway_counters(samples, names), "gateway_log": log_findings(gw, names), "recovery": back,
        "per_backend_client": er.count_by(r.get("backend") for r in records),
    }


# ------------------------------------------------------------------ (4) cost
def cost(lab, args, unsupported):
    p = {"rounds": args.cost_rounds or (2 if args.quick else 3), "duration_s": 2 if args.quick else 5,
         "connections": 16, "engines": 3, "engine_args": "--ttft-ms 0 --token-interval-ms 0 (no scheduler)",
         "configs": {"off": "no max_inflight (no queue)",
                     "queue": "max_inflight: 1000, queue: {max_len: 1000, max_wait: 10s} (never saturated)"}}
    out = {"params": p, "configs": {}}
    if not shutil.which("wrk"):
        out["skipped"] = "wrk not installed (apt-get install -y wrk)"
        log(f"cost: {out['skipped']}")
        return out
    if unsupported:
        out["configs"] = {"queue": {"unsupported": unsupported}}
    bodies_path = os.path.join(lab.work, "cost-bodies.jsonl")
    with open(bodies_path, "w") as f:
        f.write(json.dumps({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with open(os.path.join(lab.work, "cost.lua"), "w") as f:
        f.write(er.WRK_LUA)
    env = dict(os.environ, ER_BODIES=bodies_path)
    engines = start_mocks(lab, "cost", 3, ["--ttft-ms", "0", "--token-interval-ms", "0"])
    procs = [e[2] for e in engines]
    try:
        backends = [a for _, a, _ in engines]
        gws = {}
        for name, pl in (("off", flow_lines()), ("queue", flow_lines(1000, 1000, "10s"))):
            if name in out["configs"]:
                continue
            try:
                gws[name] = start_gateway(lab, f"cost-{name}-gw", backends, gateway_yaml(backends, args.threads, pl))
                procs.append(gws[name].proc)
            except Unsupported as e:
                out["configs"][name] = {"unsupported": str(e)}
        log(f"cost: wrk -t1 -c{p['connections']}, {p['rounds']} rounds x {p['duration_s']} s, gateways: "
            + ", ".join(f"{k} {g.addr}" for k, g in gws.items()))
        for gw in gws.values():
            er.wrk_run(lab, gw, p["connections"], 1, env)
        raw = []
        order = list(gws)
        for r in range(p["rounds"]):
            k = r % max(len(order), 1)
            for name in order[k:] + order[:k]:
                if STOP.is_set():
                    raise KeyboardInterrupt
                x = er.wrk_run(lab, gws[name], p["connections"], p["duration_s"], env)
                x.update(config=name, round=r)
                raw.append(x)
                log(f"cost round {r} {name:<6} {x['rps']:>8.0f} req/s  p50 {x['p50_us']} us  p99 {x['p99_us']} us  "
                    f"gateway {x['gateway_cpu_us_per_req']:.1f} us/req  non2xx {x['non2xx']} "
                    f"socket errors {x['socket_errors']}")
        for name, gw in gws.items():
            rs = [x for x in raw if x["config"] == name]
            out["configs"][name] = {
                "rps": med([x["rps"] for x in rs]), "p50_us": med([x["p50_us"] for x in rs]),
                "p99_us": med([x["p99_us"] for x in rs]),
                "gateway_cpu_us_per_req": med([x["gateway_cpu_us_per_req"] for x in rs]),
                "non2xx": sum(x["non2xx"] for x in rs), "socket_errors": sum(x["socket_errors"] for x in rs),
                "rounds": rs, "gateway": gateway_counters(er.scrape(gw.addr)), "gateway_log": log_findings(gw)}
    finally:
        lab.stop_some(procs)
    return out


# ------------------------------------------------------------------ goals

def fv(x, unit=""):
    return "n/a" if x is None else f"{x:,.4g}{unit}"


def goals(R):
    out = []
    if "overload" in R:
        s = "overload"
        q = R[s]["runs"].get("with-queue") or {}
        ok = "unsupported" not in q and q.get("served_rps") is not None
        cap = R[s]["params"]["capacity_rps"]
        v = q.get("served_over_capacity") if ok else None
        out.append(goal(s, "with the queue: served throughput within 5 % of capacity",
                        None if v is None else abs(v - 1) <= 0.05,
                        f"{fv(q.get('served_rps'), ' req/s')} vs {cap:g} (x{fv(v)})"))
        mi = R[s]["params"]["max_inflight"]
        ma, mq = (q.get("engine_max_active"), q.get("engine_max_queued")) if ok else (None, None)
        out.append(goal(s, f"with the queue: engines never above max_inflight ({mi}): max_active <= {mi}, "
                           "max_queued = 0",
                        None if ma is None else (ma <= mi and mq == 0), f"max_active {fv(ma)}, max_queued {fv(mq)}"))
        rf, rv = (q.get("refused"), q.get("refused_valid")) if ok else (None, None)
        out.append(goal(s, "with the queue: every refusal a 503 server_overloaded with Retry-After",
                        None if rf is None else rf == rv,
                        f"{fv(rv)} of {fv(rf)} refusals; time to 503 p50/p99 "
                        f"{fv((q.get('time_to_503_ms') or {}).get('p50'), ' ms')}/"
                        f"{fv((q.get('time_to_503_ms') or {}).get('p99'), ' ms')}"))
        oe = q.get("other_errors") if ok else None
        out.append(goal(s, "with the queue: 0 other errors", None if oe is None else oe == 0,
                        f"{fv(oe)}" + (f": {q.get('other_errors_kinds')}" if oe else "")))
    if "noisy-neighbour" in R:
        s = "noisy-neighbour"
        P = R[s]["phases"]

        def b99(ph):
            x = P.get(ph) or {}
            return None if "unsupported" in x or not x.get("B") else x["B"]["latency_ms"]["p99"]
        base = b99("b-alone")
        for ph, f in (("a+b", 1.5), ("a+b-high", 1.2)):
            v = b99(ph)
            out.append(goal(s, f"{ph}: B's p99 <= {f}x unloaded (b-alone)",
                            None if v is None or base is None else v <= f * base,
                            f"{fv(v, ' ms')} vs {fv(base, ' ms')}" + (f" (x{v / base:.2f})" if v and base else "")))
        x = P.get("backlogged") or {}
        ab, j = (x.get("a_over_b"), x.get("jain")) if "unsupported" not in x else (None, None)
        out.append(goal(s, "backlogged: served A:B within 10 % of 1:1",
                        None if ab is None else abs(ab - 1) <= 0.10,
                        f"A {fv((x.get('A') or {}).get('served_rps'), '/s')}, B "
                        f"{fv((x.get('B') or {}).get('served_rps'), '/s')} (A:B {fv(ab)})"))
        out.append(goal(s, "backlogged: Jain's fairness index >= 0.95", None if j is None else j >= 0.95, fv(j)))
    if "faults" in R:
        s = "faults"
        x = R[s]
        ok = "unsupported" not in x and "requests" in x
        u = x.get("unaccounted") if ok else None
        out.append(goal(s, "no client error but streams that had started on the killed engine and ended with an "
                           "SSE error event", None if u is None else u == 0,
                        f"{fv(x.get('errors'))} errors: {fv(x.get('accounted'))} accounted, {fv(u)} other"
                        + (f" {x.get('unaccounted_kinds')}" if u else "")))
        tls = [{t["fault"]: t for t in xr.get("timeline", [])} for xr in (x.get("rounds") or [x])] if ok else []

        def when(f, key):
            return ", ".join(fv(tl.get(f, {}).get(key), " s") for tl in tls)
        for f, eng in (("reset", "e1"), ("503", "e2")):
            out.append(goal(s, f"{f} fault: {eng} ejected",
                            None if not tls else all(tl.get(f, {}).get("ejected_after_s") is not None for tl in tls),
                            f"{when(f, 'ejected_after_s')} after the fault began"))
        out.append(goal(s, "kill: e0 out of rotation (ejected or unhealthy)",
                        None if not tls else all(tl.get("kill", {}).get("ejected_after_s") is not None or
                                                 tl.get("kill", {}).get("unhealthy_after_s") is not None
                                                 for tl in tls),
                        f"ejected after {when('kill', 'ejected_after_s')}, unhealthy after "
                        f"{when('kill', 'unhealthy_after_s')}"))
        rec = x.get("recovery") if ok else None
        out.append(goal(s, "afterwards every backend healthy, not ejected, serving",
                        None if rec is None else rec["all_back"],
                        "" if rec is None else f"within {rec['waited_s']} s, {rec['requests']} requests; "
                        f"served by {rec['served_by']}; " + ", ".join(
                            f"{k}: ejected {v['ejected']} healthy {v['healthy']}" for k, v in rec["services"].items())))
        pa = [xr.get("probe_abandoned") for xr in (x.get("rounds") or [x])] if ok else []
        pa_ok = None if not pa or not all(p and p.get("probe_sent") for p in pa) else all(p["back"] for p in pa)
        out.append(goal(s, "a backend whose half-open probe was abandoned by its client comes back", pa_ok,
                        "; ".join(f"probe reached {p.get('engine')}: {p.get('probe_sent')}, back: {p.get('back')} "
                                  f"({p.get('requests_after')} requests after, served by {p.get('served_after')}, "
                                  f"/services {p.get('services')})" for p in pa if p)))
    return out


# ------------------------------------------------------------------ report

def rd_label(t, x):
    return f" (round {t['rd']})" if x.get("rounds") else ""


def kinds_str(d):
    return ", ".join(f"{k} {v}" for k, v in (d or {}).items()) or "–"


def markdown(res):
    m, R = res["meta"], res["results"]
    L = [f"# Flow-control benchmark (issue #15), {m['timestamp']}{' (quick)' if m['quick'] else ''}", "",
         f"`{m['command']}` — infergate {m['binaries'].get('infergate_version')} "
         f"(built {m['binaries']['infergate']['mtime']}), mock-engine built {m['binaries']['mock-engine']['mtime']}, "
         f"git {m['git_rev']}{' (dirty)' if m['git_dirty'] else ''}; {m['cores']} cores, load average "
         f"{fmt(m['loadavg_start'][0], 2)} at start, {fmt(m['loadavg_end'][0], 2)} at end; {m['duration_s']:.0f} s in all.",
         "", "Open-loop client: this script's asyncio client (fixed arrival rate per tenant, one task per request, "
         "keep-alive connections). Absolute numbers from a shared 2-core machine hold for nothing.", ""]
    if m.get("binaries_changed"):
        L += ["**Warning**: a binary in target/release was rebuilt during this run; figures may mix builds.", ""]
    if m.get("unsupported"):
        L += [f"**{m['unsupported']}**", ""]
    if res["goals"]:
        L += ["## Goals (informational)", "", "| scenario | goal | result | figures |", "|---|---|---|---|"]
        L += [f"| {g['scenario']} | {g['goal']} | **{g['status']}** | {g['detail'].replace('|', '/')} |"
              for g in res["goals"]]
        L.append("")
    if "overload" in R:
        s = R["overload"]
        p = s["params"]
        L += ["## overload", "",
              f"{p['engines']} mocks `{p['engine_args']}`, {p['request']}: capacity {p['capacity_rps']:g} req/s. "
              f"Offered {p['offered_rps']:g} req/s (2×) open loop for {p['duration_s']} s; figures over "
              f"[{p['warmup_s']} s, {p['duration_s']} s) (served by completion time, the rest by send time). "
              f"With the queue: `max_inflight: {p['max_inflight']}`, `queue: {{max_len: {p['queue']['max_len']}, "
              f"max_wait: {p['queue']['max_wait_s']}s}}`; without: no max_inflight (the engines queue). Client "
              f"timeout {p['client_timeout_s']:g} s." + (f" Medians over {p['rounds']} rounds, counts summed."
                                                        if p["rounds"] > 1 else ""), "",
              "| run | offered req/s | served req/s | served / capacity | latency p50 ms | p99 ms | refused 503 "
              "| of which server_overloaded + Retry-After | by bound | time to 503 p50 / p99 ms | Retry-After s "
              "min/p50/max | other errors | engine max_active / max_queued | gateway queue max | gateway CPU s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---|---|---:|---:|"]
        for name, x in s["runs"].items():
            if "unsupported" in x or "skipped" in x:
                L.append(f"| {name} | {x.get('unsupported') or x.get('skipped')} |" + " |" * 13)
                continue
            ra = x.get("retry_after_s") or {}
            t5 = x["time_to_503_ms"]
            L.append(f"| {name} | {fmt(x['offered_rps'])} | {fmt(x['served_rps'])} | {fmt(x['served_over_capacity'], 3)} "
                     f"| {fmt(x['latency_ms']['p50'])} | {fmt(x['latency_ms']['p99'])} | {fmt(x['refused'])} | "
                     f"{fmt(x['refused_valid'])} | {kinds_str(x['refused_by'])} | {fmt(t5['p50'])} / {fmt(t5['p99'])} | "
                     f"{'/'.join(fmt(ra.get(k)) for k in ('min', 'p50', 'max')) if ra else '–'} | "
                     f"{fmt(x['other_errors'])}{' (' + kinds_str(x['other_errors_kinds']) + ')' if x['other_errors'] else ''} | "
                     f"{fmt(x['engine_max_active'])} / {fmt(x['engine_max_queued'])} | "
                     f"{fmt(x['gateway_queue_length_max'])} | {fmt(x['gateway_cpu_s'], 2)} |")
        L.append("")
        L += ["Gateway queue outcomes (`infergate_queue_requests_total`): " + "; ".join(
            f"{n}: {kinds_str((x.get('gateway') or {}).get('queue_requests'))}" for n, x in s["runs"].items()
            if "gateway" in x), ""]
    if "noisy-neighbour" in R:
        s = R["noisy-neighbour"]
        p = s["params"]
        L += ["## noisy-neighbour", "",
              f"{p['engines']} mocks `{p['engine_args']}`, {p['request']}: capacity {p['capacity_rps']:g} req/s; "
              f"gateway `max_inflight: {p['max_inflight']}`, `queue: {{aging: 2s}}`, max_len and max_wait per phase; tenants A and B are two API keys (weight 1). Each phase "
              f"{p['phase_s']} s on fresh processes; figures over [{p['warmup_s']} s, {p['phase_s']} s). "
              "Latency = send → end of the response, served requests only. A:B and Jain = (a+b)² / 2(a²+b²) over "
              "the served rates, shown where both tenants offer more than their fair share (backlogged).", "",
              "| phase | B priority | max_len | max_wait s | A offered/s | B offered/s | A served/s | B served/s | A:B | Jain | "
              "B p50 ms | B p99 ms | B refused | A refused | other errors A/B | engine max_queued |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|"]
        pp = {q["phase"]: q for q in p["phases"]}
        for name, x in s["phases"].items():
            if "unsupported" in x:
                L.append(f"| {name} | {x['unsupported']} |" + " |" * 14)
                continue
            A, B = x.get("A") or {}, x["B"]
            q = pp[name]
            L.append(f"| {name} | {q['b_priority']} | {q['max_len']} | {q['max_wait_s']:g} | {fmt(A.get('offered_rps'))} | "
                     f"{fmt(B['offered_rps'])} | {fmt(A.get('served_rps'))} | {fmt(B['served_rps'])} | "
                     + (f"{fmt(x.get('a_over_b'), 3)} | {fmt(x.get('jain'), 3)} | " if name == "backlogged" else "– | – | ")
                     + f"{fmt(B['latency_ms']['p50'])} | "
                     f"{fmt(B['latency_ms']['p99'])} | {fmt(B['refused'])} ({kinds_str(B['refused_by'])}) | "
                     f"{fmt(A.get('refused'))} ({kinds_str(A.get('refused_by'))}) | "
                     f"{fmt(A.get('other_errors'))}/{fmt(B['other_errors'])} | {fmt(x['engine_max_queued'])} |")
        L.append("")
    if "faults" in R:
        x = R["faults"]
        p = x["params"]
        L += ["## faults", "",
              f"3 mocks `{p['engine_args']}`, {p['request']} at {p['rate_rps']:g}/s for {p['duration_s']} s. Gateway: "
              f"{p['gateway']}. Faults: {p['faults']} ({p['fault_s']} s). /services polled every 50 ms.", ""]
        if "unsupported" in x:
            L += [x["unsupported"], ""]
        elif "requests" in x:
            g = x["gateway"]
            L += [f"Requests {x['requests']}: {x['ok']} complete, {x['errors']} failed: {x['accounted']} accounted "
                  f"(started on the killed e0, ended by an SSE error event: {kinds_str(x['accounted_kinds'])}), "
                  f"**{x['unaccounted']} other** ({kinds_str(x['unaccounted_kinds'])}). Latency p50/p99 "
                  f"{fmt(x['latency_ms']['p50'])}/{fmt(x['latency_ms']['p99'])} ms, TTFT p50/p99 "
                  f"{fmt(x['ttft_ms']['p50'])}/{fmt(x['ttft_ms']['p99'])} ms. Retries "
                  f"(`infergate_retries_total`): {kinds_str(g['retries'])}; refused by the budget: "
                  f"{g['retry_budget_exhausted']}; ejections (`infergate_backend_ejections_total`): "
                  f"{kinds_str(g['ejections'])}; requests per engine (client view): "
                  f"{kinds_str(x['per_backend_client'])}.", "",
                  "| fault | engine | from s | to s | ejected after s | back in rotation after s | unhealthy after s "
                  "| healthy again after s | client errors during |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
            for t in [dict(t, rd=rd) for rd, xr in enumerate(x.get("rounds") or [x]) for t in xr["timeline"]]:
                L.append(f"| {t['fault']}{rd_label(t, x)} | "
                         f"{t['engine']} | {fmt(t['start_s'], 2)} | {fmt(t['end_s'], 2)} | "
                         f"{fmt(t['ejected_after_s'], 2)} | {fmt(t['back_in_rotation_s'], 2)} | "
                         f"{fmt(t['unhealthy_after_s'], 2)} | {fmt(t['healthy_again_s'], 2)} | "
                         f"{t['client_errors_during']} |")
            rec = x["recovery"]
            L += ["", f"After the load: every backend back (healthy, not ejected, serving): **{rec['all_back']}** "
                      f"after {rec['waited_s']} s ({rec['requests']} requests; " + ", ".join(
                          f"{k}: ejected {v['ejected']}, healthy {v['healthy']}, ejections {v['ejections']}"
                          for k, v in rec["services"].items()) + ").", ""]
            for rd, xr in enumerate(x.get("rounds") or [x]):
                pa = xr.get("probe_abandoned")
                if pa:
                    L += [f"Abandoned half-open probe{rd_label({'rd': rd}, x)}: {pa['engine']} ejected by 503s "
                          f"({pa['ejected']}), half-open ({pa['half_open']}), a slow request whose client left after "
                          f"0.3 s reached it as the probe ({pa['probe_sent']}); back in rotation afterwards: "
                          f"**{pa['back']}** ({pa.get('requests_after')} requests after, served by "
                          f"{kinds_str(pa.get('served_after'))}; /services: {pa.get('services')}).", ""]
            if x.get("fault_errors"):
                L += [f"Fault injection problems: {x['fault_errors']}", ""]
            if x["unaccounted_first"]:
                L += ["Unaccounted failures (first ones; times in s since the load began):", ""]
                L += [f"- `{json.dumps(r)[:300]}`" for r in x["unaccounted_first"]] + [""]
    if "cost" in R:
        s = R["cost"]
        p = s["params"]
        L += ["## cost", ""]
        if s.get("skipped"):
            L += [s["skipped"], ""]
        else:
            L += [f"wrk -t1 -c{p['connections']}, closed loop, non-streaming chats, 3 mocks {p['engine_args']}; "
                  f"medians of {p['rounds']} rounds × {p['duration_s']} s, gateways alternating. off = "
                  f"{p['configs']['off']}; queue = {p['configs']['queue']}.", "",
                  "| config | req/s | p50 µs | p99 µs | gateway CPU µs/request | non-2xx | socket errors |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
            for name, x in s["configs"].items():
                if "unsupported" in x:
                    L.append(f"| {name} | {x['unsupported']} |" + " |" * 5)
                    continue
                L.append(f"| {name} | {fmt(x['rps'], 0)} | {fmt(x['p50_us'])} | {fmt(x['p99_us'])} | "
                         f"{fmt(x['gateway_cpu_us_per_req'])} | {x['non2xx']} | {x['socket_errors']} |")
            a, b = s["configs"].get("queue", {}), s["configs"].get("off", {})
            if a.get("gateway_cpu_us_per_req") and b.get("gateway_cpu_us_per_req"):
                L += ["", f"queue / off: CPU per request ×{a['gateway_cpu_us_per_req'] / b['gateway_cpu_us_per_req']:.2f}, "
                          f"p99 ×{a['p99_us'] / b['p99_us']:.2f}, req/s ×{a['rps'] / b['rps']:.2f}."]
            L.append("")
    notes = []
    for scen, s in R.items():
        for name, x in list((s.get("runs") or {}).items()) + list((s.get("phases") or {}).items()) + \
                list((s.get("configs") or {}).items()) + ([("run", s)] if scen == "faults" else []):
            if isinstance(x, dict) and x.get("gateway_log", {}).get("count"):
                notes.append(f"{scen} {name}: gateway log: {log_kinds(x['gateway_log'])}")
            cl = x.get("client") if isinstance(x, dict) else None
            if cl and cl.get("lag_p99_ms") and cl["lag_p99_ms"] > 50:
                notes.append(f"{scen} {name}: the client fell behind its schedule (send lag p99 "
                             f"{cl['lag_p99_ms']} ms, max {cl['lag_max_ms']} ms): the machine was busy")
    if notes:
        L += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(L)


# ------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", action="append", choices=SCENARIOS, help="repeatable; default: all")
    ap.add_argument("--quick", action="store_true", help="a smoke-sized run, ~3 min")
    ap.add_argument("--out", help="BASE of BASE.json and BASE.md")
    ap.add_argument("--check", action="store_true", help="exit 1 when a goal fails or cannot be evaluated")
    ap.add_argument("--rounds", type=int, default=1,
                    help="overload, noisy-neighbour, faults: run everything N times on fresh processes, "
                         "medians of figures, sums of counts (1)")
    ap.add_argument("--cost-rounds", type=int, help="cost: wrk rounds per config (3; --quick 2)")
    ap.add_argument("--duration", type=float, help="overload: seconds of load per run (120; --quick 20)")
    ap.add_argument("--phase-seconds", type=float, help="noisy-neighbour: seconds per phase (30; --quick 10)")
    ap.add_argument("--faults-seconds", type=float, help="faults: seconds of load (45; --quick 15)")
    ap.add_argument("--faults-rate", type=float, default=30, help="faults: streams per second (30)")
    ap.add_argument("--client-timeout", type=float, default=10,
                    help="seconds a request may take in all before the client gives up (10)")
    ap.add_argument("--threads", type=int, default=2, help="gateway worker threads (2)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    scens = [s for s in SCENARIOS if s in (args.scenario or SCENARIOS)]
    for b in ("infergate", "mock-engine"):
        if not os.access(os.path.join(BIN, b), os.X_OK):
            sys.exit(f"no {b} in {BIN}: cargo build --release --bins")
    ts = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = args.out or os.path.join(HERE, "results", f"flow-control-{'quick-' if args.quick else ''}{ts}")
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)

    def on_signal(signum, _frame):
        STOP.set()
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.time()
    lab = er.Lab(threads=args.threads, pin=False, keep=args.keep)
    meta = {"timestamp": ts, "quick": args.quick, "scenarios": scens, "rounds": args.rounds,
            "command": " ".join(["load-tests/flow_control.py"] + sys.argv[1:]), "gateway_threads": args.threads,
            "client_timeout_s": args.client_timeout, "binaries": er.binaries(), "cores": os.cpu_count(),
            "loadavg_start": os.getloadavg(), "python": platform.python_version(),
            "git_rev": er.sh(["git", "rev-parse", "--short", "HEAD"]),
            "git_dirty": bool(er.sh(["git", "status", "--porcelain", "--untracked-files=no"]))}
    res = {"meta": meta, "results": {}}
    log(f"scenarios {scens}; infergate {meta['binaries']['infergate_version']} built "
        f"{meta['binaries']['infergate']['mtime']}; load average {meta['loadavg_start']}; work dir {lab.work}")
    try:
        unsupported = support(lab, args)
        if unsupported:
            meta["unsupported"] = unsupported
            log(unsupported)
        runners = {"overload": overload, "noisy-neighbour": noisy_neighbour, "faults": faults, "cost": cost}
        for s in scens:
            res["results"][s] = runners[s](lab, args, unsupported)
    except KeyboardInterrupt:
        STOP.set()
        log("interrupted; stopping everything")
        return 130
    finally:
        lab.stop_all()
    return lablib.finish(res, base, started, er.binaries(), goals, markdown, args.check, log)


if __name__ == "__main__":
    sys.exit(main())
