#!/usr/bin/env python3
"""soak.py — infergate under mixed load while engines die, stall and restart.

`make soak` (10 minutes, not in CI) and `make soak-smoke` (`--duration 60`, part of
`make test`). Only the Python standard library is used.

What runs (everything on 127.0.0.1, in a temporary work directory):
- 3 mock engines (`e0`..`e2`, fixed ports once picked) serving a chat and an embeddings
  model, 32 tokens per answer, 20 ms to the first, then one every 10 ms;
- infergate on a generated config: two pools over the 3 engines, health checks every
  200 ms, `timeouts.first_byte` / `idle` 3 s, the `auth` filter (a keys file with an admin
  key and 4 user keys, all with token quotas) and `limits` (quota store in the work dir),
  a JSON access log to a file;
- 9 clients: 6 workers mixing chat streams (some asking `include_usage`), plain chat,
  embeddings and 10 % streams they abort after the first token (3 on keep-alive
  connections, 3 on a new connection per request), one worker on the rotating key, one
  slow sender (body trickled over ~2 s) and one slow reader (100 ms per SSE event);
- faults during the timed phase, each every 10 s: an engine is killed (SIGKILL) and
  restarted on its port, stalled (SIGSTOP 4 s, SIGCONT) or restarted (SIGTERM), in turn;
  the config is rewritten (a pool changes) and reloaded (SIGHUP and POST /admin/reload in
  turn); the keys file is rotated (a new key replaces the oldest, atomic rename; picked up
  by POST /admin/reload-keys and by the file watch in turn).

Checks (exit 1 when one fails):
1. every request either completed correctly (content, usage), was aborted by its client,
   or failed with an OpenAI-shaped error (JSON body or a final `data: {"error":...}`
   event) and is accounted for: its engine (access log `backend`, else `x-mock-instance`)
   was killed/restarted while it was in flight, or stalled during it. A cut connection is
   accounted only after the response head, on an engine that died while it was in flight.
   Anything else fails: an unaccounted error, a non-OpenAI body, a cut before the head;
2. no request hung (no read waited 20 s, none took 60 s);
3. quota: per user, `quota_used` summed over its keys in `GET /admin/usage` equals
   Σ (prompt + completion) the engine reported for each completed request (the mock is
   deterministic: the expected usage of each request is known, and equals what the
   client saw where usage is visible) plus, for each request that did not complete
   (client aborts, engine failures mid-stream), the tokens its access-log line says were
   settled (`usage: estimated` or `reported`); every completed request's access line
   says `reported` with exactly the expected tokens; requests that failed before any
   response settled nothing; no access line is missing; no reservation or slot is left;
4. the gateway's fds and RSS after the load stopped are back within bounds of their
   values after the warm-up (both measured idle): fds <= max(before x 1.10, before + 5),
   RSS <= before x 1.10 (waiting up to 30 s for them to settle);
5. every reload and key rotation succeeded; the gateway did not panic or exit.
"""
import argparse
import hashlib
import http.client
import json
import os
import random
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BIN = os.environ.get("SOAK_BIN_DIR", os.path.join(REPO, "target", "release"))

CHAT = "soak-chat"
EMBED = "soak-embed"
ENGINE_TOKENS = 32            # mock --tokens: completion tokens when max_tokens allows
TOKEN_INTERVAL_MS = 10
TTFT_MS = 20                  # so that a kill also meets requests waiting for their first byte
ENGINES = 3
ADMIN_KEY = "sk-soak-admin-" + "0" * 24
USER_KEYS = {"alice": "sk-soak-alice-" + "1" * 24, "bob": "sk-soak-bob-" + "2" * 24,
             "carol": "sk-soak-carol-" + "3" * 24}
ROT_USER = "rot"
QUOTA = 1_000_000_000
READ_TIMEOUT = 20.0           # no byte for this long: the request hung
HANG_LIMIT = 60.0             # a request taking longer than this hung
FAULT_EVERY = 10.0
STALL_S = 4.0
KILL_DOWN_S = 1.0
FD_SLACK = 5
RESOURCE_RATIO = 1.10
SETTLE_LIMIT = 30.0

T0 = time.monotonic()


def now():
    return time.monotonic() - T0


def log(msg):
    print(f"[soak {time.strftime('%H:%M:%S')} +{now():6.1f}s] {msg}", flush=True)


def read_line(pipe, timeout):
    """First line of a child's stdout within `timeout` (b'' if none)."""
    end = time.monotonic() + timeout
    buf = b""
    fd = pipe.fileno()
    while time.monotonic() < end and not buf.endswith(b"\n"):
        r, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if not r:
            break
        b = os.read(fd, 1)
        if not b:
            break
        buf += b
    return buf.decode(errors="replace").strip()


# ---------------------------------------------------------------- processes

class Engine:
    def __init__(self, idx, workdir):
        self.idx = idx
        self.name = f"e{idx}"
        self.port = 0
        self.proc = None
        self.lock = threading.Lock()
        self.log = open(os.path.join(workdir, f"engine-{self.name}.log"), "ab")

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"

    def start(self):
        last = ""
        for _ in range(50):
            p = subprocess.Popen(
                [os.path.join(BIN, "mock-engine"), "--listen", f"127.0.0.1:{self.port}",
                 "--name", self.name, "--model", CHAT, "--model", EMBED,
                 "--tokens", str(ENGINE_TOKENS), "--token-interval-ms", str(TOKEN_INTERVAL_MS),
                 "--ttft-ms", str(TTFT_MS),
                 "--threads", "1"],
                stdout=subprocess.PIPE, stderr=self.log)
            last = read_line(p.stdout, 10)
            if last and ":" in last:
                self.port = int(last.rsplit(":", 1)[1])
                self.proc = p
                return
            p.kill()
            p.wait()
            time.sleep(0.1)  # the port may still be held a moment after a kill
        raise RuntimeError(f"mock-engine {self.name} did not start on port {self.port}: {last!r}")

    def signal(self, sig):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


class Gateway:
    def __init__(self, workdir, config_path):
        self.workdir = workdir
        self.config_path = config_path
        self.stderr_path = os.path.join(workdir, "gateway.stderr")
        self.proc = None
        self.addr = None

    def start(self):
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self.proc = subprocess.Popen(
            [os.path.join(BIN, "infergate"), "--config", self.config_path],
            stdout=subprocess.PIPE, stderr=open(self.stderr_path, "ab"), env=env)
        line = read_line(self.proc.stdout, 60)
        prefix = "infergate listening on http://"
        if not line.startswith(prefix):
            self.stop()
            raise RuntimeError(f"infergate did not start: {line!r}\n{self.stderr()[-3000:]}")
        self.addr = line[len(prefix):]
        # keep draining stdout so the gateway never blocks on it
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        try:
            while self.proc.stdout.read(4096):
                pass
        except (OSError, ValueError):
            pass

    def stderr(self):
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def fds(self):
        try:
            return len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        except OSError:
            return None

    def rss_kib(self):
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def threads(self):
        try:
            return len(os.listdir(f"/proc/{self.proc.pid}/task"))
        except OSError:
            return None

    def call(self, method, path, body=None, key=ADMIN_KEY, timeout=10):
        host, port = self.addr.rsplit(":", 1)
        c = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            headers = {"Authorization": f"Bearer {key}"}
            if body is not None:
                headers["Content-Type"] = "application/json"
            c.request(method, path, body=body, headers=headers)
            r = c.getresponse()
            data = r.read()
            return r.status, data
        finally:
            c.close()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------- config and keys

def config_yaml(workdir, engines, generation):
    """The gateway config; `generation` changes the chat pool (a weight and the balance)
    so every reload really changes a pool."""
    weight = 1 + generation % 2
    balance = "round_robin" if generation % 2 == 0 else "least_inflight"
    hc = "{ path: /health, interval: 200ms, timeout: 500ms, unhealthy_after: 2, healthy_after: 1 }"
    chat_backends = ", ".join(
        [f'{{ address: "{engines[0].addr}", weight: {weight} }}'] + [f'"{e.addr}"' for e in engines[1:]])
    embed_backends = ", ".join(f'"{e.addr}"' for e in engines)
    return f"""# generated by load-tests/soak.py (generation {generation})
server:
  listen: "127.0.0.1:0"
  threads: 2
  watch_config: false
  grace_period: 2s
  client_body_timeout: 10s
  upgrade_sock: {workdir}/upgrade.sock
timeouts:
  connect: 1s
  first_byte: 3s
  idle: 3s
upstream:
  keepalive_idle: 2s
access_log:
  output: file
  path: {workdir}/access.log
pools:
  - name: chat
    models: ["{CHAT}"]
    backends: [{chat_backends}]
    balance: {balance}
    health_check: {hc}
    discover_models: false
  - name: embed
    models: ["{EMBED}"]
    backends: [{embed_backends}]
    health_check: {hc}
    discover_models: false
filters:
  - request_id: {{}}
  - auth:
      api_keys_file: {workdir}/keys.json
  - limits:
      global: {{ concurrent: 64 }}
      per_key: {{ tokens_per_minute: 20000000 }}
      data_dir: {workdir}/data
"""


def write_atomic(path, text):
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def hashed(key):
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def keys_json(rot_keys, rotation):
    keys = [{"key": hashed(ADMIN_KEY), "user": "ops", "role": "admin"}]
    for user, key in USER_KEYS.items():
        # the quota moves a little with every rotation, so the file really changes
        keys.append({"key": hashed(key), "user": user, "quota": QUOTA + rotation})
    for key in rot_keys:
        keys.append({"key": hashed(key), "user": ROT_USER, "quota": QUOTA + rotation})
    return json.dumps({"keys": keys}, indent=1)


# ---------------------------------------------------------------- requests

class Rec:
    __slots__ = ("rid", "kind", "user", "phase", "start", "t_head", "t_first", "end", "status",
                 "outcome", "detail", "code", "instance", "expected", "seen_usage", "chunks",
                 "reused", "engine", "access", "accounted_by", "body_len")

    def __init__(self, rid, kind, user, phase):
        self.rid, self.kind, self.user, self.phase = rid, kind, user, phase
        self.start = now()
        self.t_head = self.t_first = self.end = None
        self.status = None
        self.outcome = None     # ok aborted error cut hung wrong badshape
        self.detail = ""
        self.code = None
        self.instance = None
        self.expected = None    # (prompt, completion) the engine reports for it
        self.seen_usage = None
        self.chunks = 0
        self.reused = False
        self.engine = None
        self.access = None
        self.accounted_by = None
        self.body_len = 0


def prompt_tokens(text):
    return max(1, len(text) // 4)  # the mock: characters / 4, at least 1


WORDS = "the quick brown fox jumps over a lazy dog while engines come and go".split()


def make_text(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def make_request(rng, kind, pad=0):
    """(path, body bytes, expected (prompt, completion), stream, include_usage)."""
    if kind == "embed":
        if rng.random() < 0.5:
            inp = make_text(rng, rng.randint(1, 40) + pad)
            expected = (prompt_tokens(inp), 0)
        else:
            inp = [make_text(rng, rng.randint(1, 20) + pad) for _ in range(rng.randint(2, 4))]
            expected = (sum(prompt_tokens(i) for i in inp), 0)
        body = {"model": EMBED, "input": inp}
        return "/v1/embeddings", json.dumps(body).encode(), expected, False, False
    content = make_text(rng, rng.randint(1, 60) + pad)
    max_tokens = rng.randint(4, ENGINE_TOKENS + 8)
    body = {"model": CHAT, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens}
    stream = kind in ("stream", "stream_usage", "abort", "slow_read")
    include_usage = kind == "stream_usage"
    if stream:
        body["stream"] = True
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    expected = (prompt_tokens(content), min(ENGINE_TOKENS, max_tokens))
    return "/v1/chat/completions", json.dumps(body).encode(), expected, stream, include_usage


def openai_error(obj):
    e = obj.get("error") if isinstance(obj, dict) else None
    return (isinstance(e, dict) and all(k in e for k in ("message", "type", "param", "code"))
            and isinstance(e["message"], str) and e["message"] != "")


class Client:
    """One HTTP/1.1 connection to the gateway (kept alive or not)."""

    def __init__(self, addr, keepalive):
        host, port = addr.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.keepalive = keepalive
        self.conn = None
        self.used = 0

    def connection(self):
        if self.conn is None or not self.keepalive:
            self.close()
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=READ_TIMEOUT)
            self.used = 0
        self.used += 1
        return self.conn, self.used > 1

    def close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
        self.conn = None


def run_request(client, rec, key, path, body, stream, include_usage,
                abort=False, slow_send=False, slow_read=False):
    conn, rec.reused = client.connection()
    rec.body_len = len(body)
    keep = True
    try:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                   "x-request-id": rec.rid, "Content-Length": str(len(body))}
        if not client.keepalive:
            headers["Connection"] = "close"
        if slow_send:
            conn.putrequest("POST", path, skip_accept_encoding=True)
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders()
            pieces = 5
            step = max(1, len(body) // pieces + 1)
            for i in range(0, len(body), step):
                conn.send(body[i:i + step])
                if i + step < len(body):
                    time.sleep(0.4)
        else:
            conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        rec.t_head = now()
        rec.status = resp.status
        rec.instance = resp.getheader("x-mock-instance")
        ctype = resp.getheader("content-type", "")
        if resp.status != 200:
            data = resp.read()
            rec.end = now()
            try:
                obj = json.loads(data)
            except ValueError:
                obj = None
            if openai_error(obj):
                rec.outcome, rec.code = "error", str(obj["error"].get("code"))
                rec.detail = f"{resp.status} {obj['error'].get('code')}"
            else:
                rec.outcome, rec.detail = "badshape", f"{resp.status} {data[:200]!r}"
            if resp.will_close:
                keep = False
            return
        if not stream:
            data = resp.read()
            rec.end = now()
            if resp.will_close:
                keep = False
            try:
                obj = json.loads(data)
            except ValueError:
                rec.outcome, rec.detail = "wrong", f"200 body not JSON: {data[:200]!r}"
                return
            usage = obj.get("usage") or {}
            rec.seen_usage = (usage.get("prompt_tokens"), usage.get("completion_tokens", 0))
            if rec.kind == "embed" or path.endswith("embeddings"):
                ok = isinstance(obj.get("data"), list) and len(obj["data"]) > 0
            else:
                choices = obj.get("choices") or [{}]
                ok = isinstance(choices[0].get("message", {}).get("content"), str)
            if not ok:
                rec.outcome, rec.detail = "wrong", f"200 body without the answer: {data[:200]!r}"
            elif rec.seen_usage != rec.expected:
                rec.outcome, rec.detail = "wrong", f"usage {rec.seen_usage} != expected {rec.expected}"
            else:
                rec.outcome = "ok"
            return
        if not ctype.startswith("text/event-stream"):
            rec.end = now()
            rec.outcome, rec.detail = "wrong", f"stream answered with {ctype!r}"
            keep = False
            return
        done = False
        error_event = None
        usage = None
        after_done = False
        while True:
            if now() - rec.start > HANG_LIMIT:
                rec.end = now()
                rec.outcome, rec.detail = "hung", f"stream still open after {HANG_LIMIT:.0f} s"
                keep = False
                return
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if done:
                after_done = True
            if data == b"[DONE]":
                done = True
                continue
            try:
                obj = json.loads(data)
            except ValueError:
                rec.end = now()
                rec.outcome, rec.detail = "wrong", f"SSE data not JSON: {data[:200]!r}"
                keep = False
                return
            if "error" in obj:
                error_event = obj
                continue
            if obj.get("usage"):
                usage = obj["usage"]
            for ch in obj.get("choices") or []:
                if (ch.get("delta") or {}).get("content"):
                    rec.chunks += 1
                    if rec.t_first is None:
                        rec.t_first = now()
            if abort and rec.chunks >= 1:
                # the client leaves after the first token
                rec.end = now()
                rec.outcome = "aborted"
                keep = False
                client.close()
                return
            if slow_read:
                time.sleep(0.1)
        rec.end = now()
        if resp.will_close:
            keep = False
        if error_event is not None:
            if openai_error(error_event):
                rec.outcome, rec.code = "error", str(error_event["error"].get("code"))
                rec.detail = f"SSE error event {error_event['error'].get('code')} after {rec.chunks} tokens"
            else:
                rec.outcome, rec.detail = "badshape", f"SSE error event {error_event!r:.200}"
            keep = False
            return
        if not done:
            rec.outcome, rec.detail = "cut", f"stream ended without [DONE] after {rec.chunks} tokens"
            keep = False
            return
        if usage is not None:
            rec.seen_usage = (usage.get("prompt_tokens"), usage.get("completion_tokens"))
        if after_done:
            rec.outcome, rec.detail = "wrong", "data after [DONE]"
        elif rec.chunks != rec.expected[1]:
            rec.outcome, rec.detail = "wrong", f"{rec.chunks} tokens, expected {rec.expected[1]}"
        elif include_usage and rec.seen_usage != rec.expected:
            rec.outcome, rec.detail = "wrong", f"usage {rec.seen_usage} != expected {rec.expected}"
        elif not include_usage and usage is not None:
            rec.outcome, rec.detail = "wrong", "the injected usage chunk reached the client"
        else:
            rec.outcome = "ok"
    except socket.timeout:
        rec.end = now()
        rec.outcome, rec.detail = "hung", f"no byte for {READ_TIMEOUT:.0f} s"
        keep = False
    except (OSError, http.client.HTTPException) as e:
        rec.end = now()
        where = "after the head" if rec.t_head is not None else "before the head"
        reused = " (reused connection)" if rec.reused else ""
        rec.outcome, rec.detail = "cut", f"{type(e).__name__} {where}{reused}: {e}"
        keep = False
    finally:
        if not keep:
            client.close()


# ---------------------------------------------------------------- the soak

class Soak:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = tempfile.mkdtemp(prefix="infergate-soak-")
        self.engines = [Engine(i, self.workdir) for i in range(ENGINES)]
        self.gateway = None
        self.records = []
        self.records_lock = threading.Lock()
        self.stop_load = threading.Event()
        self.stop_faults = threading.Event()
        self.phase = "warmup"
        self.faults = []          # dicts: kind, engine, t_start, t_end
        self.ops = []             # reloads and key rotations: dicts kind, t, ok, detail
        self.ops_lock = threading.Lock()
        self.generation = 0
        self.rot_keys = ["sk-soak-rot-" + secrets.token_hex(16)]
        self.rot_current = self.rot_keys[0]
        self.rot_lock = threading.Lock()
        self.rotation = 0
        self.samples = []         # (t, fds, rss_kib, threads)
        self.failures = []
        self.figures = {}

    # -- setup / teardown
    def start(self):
        for e in self.engines:
            e.start()
        write_atomic(os.path.join(self.workdir, "keys.json"), keys_json(self.rot_keys, 0))
        self.config_path = os.path.join(self.workdir, "infergate.yaml")
        write_atomic(self.config_path, config_yaml(self.workdir, self.engines, 0))
        self.gateway = Gateway(self.workdir, self.config_path)
        self.gateway.start()
        log(f"engines {[e.addr for e in self.engines]}, gateway {self.gateway.addr} "
            f"(pid {self.gateway.proc.pid}), work dir {self.workdir}")
        # every engine healthy before the load starts
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                status, data = self.gateway.call("GET", "/services", key=ADMIN_KEY)
                text = data.decode(errors="replace")
                if status == 200 and all(text.count(e.addr) for e in self.engines) and '"healthy":false' not in text:
                    break
            except OSError:
                pass
            time.sleep(0.2)

    def stop_all(self):
        for e in self.engines:
            try:
                e.stop()
            except OSError:
                pass
        if self.gateway:
            self.gateway.stop()

    # -- load
    def add(self, rec):
        with self.records_lock:
            self.records.append(rec)

    def worker(self, wid, user, keepalive, mix):
        rng = random.Random(self.args.seed * 1000 + wid)
        client = Client(self.gateway.addr, keepalive)
        kinds, weights = zip(*mix)
        n = 0
        while not self.stop_load.is_set():
            kind = rng.choices(kinds, weights)[0]
            n += 1
            rec = Rec(f"soak-{self.phase[0]}{wid}-{n}", kind, user, self.phase)
            path, body, rec.expected, stream, include_usage = make_request(rng, kind)
            if user == ROT_USER:
                with self.rot_lock:
                    key = self.rot_current
            else:
                key = USER_KEYS[user]
            rec.start = now()
            run_request(client, rec, key, path, body, stream, include_usage, abort=(kind == "abort"))
            self.add(rec)
            time.sleep(rng.uniform(0.02, 0.08))
        client.close()

    def slow_worker(self, wid, user, mode):
        rng = random.Random(self.args.seed * 1000 + wid)
        client = Client(self.gateway.addr, keepalive=True)
        n = 0
        while not self.stop_load.is_set():
            n += 1
            if mode == "send":
                kind = "slow_send_embed" if n % 2 else "slow_send"
                base = "embed" if n % 2 else "chat"
                path, body, expected, stream, include_usage = make_request(rng, base, pad=200)
            else:
                kind = "slow_read"
                path, body, expected, stream, include_usage = make_request(rng, "slow_read")
            rec = Rec(f"soak-{self.phase[0]}{wid}-{n}", kind, user, self.phase)
            rec.expected = expected
            rec.start = now()
            run_request(client, rec, USER_KEYS[user], path, body, stream, include_usage,
                        slow_send=(mode == "send"), slow_read=(mode == "read"))
            self.add(rec)
            time.sleep(rng.uniform(0.05, 0.2))
        client.close()

    def start_load(self):
        mix = [("stream", 30), ("stream_usage", 10), ("chat", 30), ("embed", 20), ("abort", 11)]
        threads = []
        for wid in range(6):
            user = "alice" if wid < 3 else "bob"
            threads.append(threading.Thread(target=self.worker, args=(wid, user, wid < 3, mix)))
        threads.append(threading.Thread(target=self.worker, args=(6, ROT_USER, True, mix)))
        threads.append(threading.Thread(target=self.slow_worker, args=(7, "carol", "send")))
        threads.append(threading.Thread(target=self.slow_worker, args=(8, "carol", "read")))
        for t in threads:
            t.daemon = True
            t.start()
        return threads

    def stop_load_and_join(self, threads):
        self.stop_load.set()
        for t in threads:
            t.join(HANG_LIMIT + 10)
            if t.is_alive():
                self.failures.append("a client thread did not finish (a request hung)")
        self.stop_load.clear()

    # -- faults
    def op(self, kind, ok, detail=""):
        with self.ops_lock:
            self.ops.append({"kind": kind, "t": now(), "ok": ok, "detail": detail})
        if not ok:
            log(f"{kind} FAILED: {detail}")

    def sleep_until(self, t):
        while not self.stop_faults.is_set() and now() < t:
            time.sleep(min(0.2, max(0.0, t - now())))
        return not self.stop_faults.is_set()

    def engine_faults(self, t_first):
        kinds = ["kill", "stall", "restart"]
        i = 0
        t = t_first
        while self.sleep_until(t):
            kind = kinds[i % len(kinds)]
            # every engine meets every kind of fault in turn
            e = self.engines[(i + i // len(kinds)) % ENGINES]
            i += 1
            with e.lock:
                f = {"kind": kind, "engine": e.idx, "t_start": now(), "t_end": None}
                if kind == "stall":
                    e.signal(signal.SIGSTOP)
                    f["t_start"] = now()
                    time.sleep(STALL_S)
                    e.signal(signal.SIGCONT)
                else:
                    e.signal(signal.SIGKILL if kind == "kill" else signal.SIGTERM)
                    f["t_start"] = now()
                    e.proc.wait()
                    if kind == "kill":
                        time.sleep(KILL_DOWN_S)
                    try:
                        e.start()
                    except RuntimeError as err:
                        self.failures.append(str(err))
                f["t_end"] = now()
            self.faults.append(f)
            log(f"fault: {kind} {e.name} ({f['t_end'] - f['t_start']:.1f} s)")
            t += FAULT_EVERY

    def reloads(self, t_first):
        t = t_first
        while self.sleep_until(t):
            self.generation += 1
            g = self.generation
            write_atomic(self.config_path, config_yaml(self.workdir, self.engines, g))
            if g % 2:
                before = self.gateway.stderr().count("config reloaded (SIGHUP)")
                self.gateway.proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 10
                ok = False
                while time.monotonic() < deadline:
                    if self.gateway.stderr().count("config reloaded (SIGHUP)") > before:
                        ok = True
                        break
                    time.sleep(0.05)
                self.op("reload (SIGHUP)", ok, "" if ok else "no `config reloaded (SIGHUP)` line within 10 s")
            else:
                try:
                    status, data = self.gateway.call("POST", "/admin/reload")
                    ok = status == 200 and json.loads(data).get("success") is True \
                        and json.loads(data).get("changes")
                    self.op("reload (POST /admin/reload)", bool(ok), f"{status} {data[:300]!r}")
                except (OSError, ValueError) as err:
                    self.op("reload (POST /admin/reload)", False, repr(err))
            t += FAULT_EVERY

    def rotations(self, t_first):
        t = t_first
        while self.sleep_until(t):
            self.rotation += 1
            new = "sk-soak-rot-" + secrets.token_hex(16)
            # the previous key stays valid for one period (a rotation with overlap)
            self.rot_keys = [self.rot_keys[-1], new]
            write_atomic(os.path.join(self.workdir, "keys.json"), keys_json(self.rot_keys, self.rotation))
            if self.rotation % 2:
                how = "keys rotation (POST /admin/reload-keys)"
                try:
                    status, data = self.gateway.call("POST", "/admin/reload-keys")
                    ok = status == 200 and json.loads(data).get("success") is True
                    detail = f"{status} {data[:300]!r}"
                except (OSError, ValueError) as err:
                    ok, detail = False, repr(err)
            else:
                how = "keys rotation (file watch)"
                ok, detail = False, "the new key was not accepted within 10 s"
            # the new key must work before the client uses it
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    status, _ = self.gateway.call("GET", "/v1/models", key=new)
                except OSError:
                    status = None
                if status == 200:
                    if how.endswith("(file watch)"):
                        ok, detail = True, ""
                    break
                time.sleep(0.1)
            else:
                ok, detail = False, "the new key was not accepted within 10 s"
            if ok:
                with self.rot_lock:
                    self.rot_current = new
            self.op(how, ok, detail)
            t += FAULT_EVERY

    def monitor(self):
        while not self.stop_faults.is_set():
            self.samples.append((now(), self.gateway.fds(), self.gateway.rss_kib(), self.gateway.threads()))
            if not self.gateway.alive():
                self.failures.append(f"the gateway exited (status {self.gateway.proc.returncode})")
                return
            time.sleep(1.0)

    # -- resources
    def idle_resources(self, min_wait, max_wait, before=None):
        """fds and RSS once idle: after `min_wait`, when the fd count held still for 2 s
        (or, with `before`, as soon as both are within bounds); at most `max_wait`."""
        start = time.monotonic()
        last_fds = []
        while True:
            fds, rss = self.gateway.fds(), self.gateway.rss_kib()
            waited = time.monotonic() - start
            last_fds.append(fds)
            if waited >= min_wait:
                if before is not None:
                    if within(before, (fds, rss)):
                        return fds, rss, waited
                elif len(last_fds) >= 3 and len(set(last_fds[-3:])) == 1:
                    return fds, rss, waited
            if waited >= max_wait:
                return fds, rss, waited
            time.sleep(1.0)

    # -- run
    def run(self):
        args = self.args
        self.start()
        threads = self.start_load()
        log(f"warm-up {args.warmup:.0f} s (load, no faults)")
        time.sleep(args.warmup)
        self.stop_load_and_join(threads)
        fds0, rss0, waited = self.idle_resources(5, 15)
        self.figures["before"] = (fds0, rss0)
        log(f"baseline after warm-up (idle {waited:.0f} s): {fds0} fds, {rss0} KiB RSS")

        self.phase = "main"
        t_main = now()
        threads = self.start_load()
        fault_threads = [
            threading.Thread(target=self.engine_faults, args=(t_main + 3,)),
            # engine faults at +3 s, reloads at +5 s (every third one during a stall), key
            # rotations at +8 s, each every 10 s
            threading.Thread(target=self.reloads, args=(t_main + 5,)),
            threading.Thread(target=self.rotations, args=(t_main + 8,)),
            threading.Thread(target=self.monitor),
        ]
        for t in fault_threads:
            t.daemon = True
            t.start()
        log(f"soak {args.duration:.0f} s: load + a fault, a reload and a key rotation every {FAULT_EVERY:.0f} s")
        next_report = t_main + 60
        while now() < t_main + args.duration and self.gateway.alive():
            time.sleep(0.5)
            if now() >= next_report:
                with self.records_lock:
                    n = len(self.records)
                log(f"{n} requests so far, {len(self.faults)} engine faults, "
                    f"{len(self.ops)} reloads/rotations, fds {self.gateway.fds()}, RSS {self.gateway.rss_kib()} KiB")
                next_report += 60
        self.stop_faults.set()
        for t in fault_threads:
            t.join(30)
        self.stop_load_and_join(threads)
        self.figures["main_s"] = now() - t_main
        log("load stopped; waiting for the gateway to settle")
        if not self.gateway.alive():
            self.failures.append(f"the gateway exited (status {self.gateway.proc.returncode})")
            return
        fds1, rss1, waited = self.idle_resources(3, SETTLE_LIMIT, before=(fds0, rss0))
        self.figures["after"] = (fds1, rss1, waited)
        self.figures["threads_after"] = self.gateway.threads()
        self.check()

    # -- checks
    def check(self):
        gw = self.gateway
        # usage: wait until nothing is in flight or reserved
        deadline = time.monotonic() + 10
        usage = []
        while time.monotonic() < deadline:
            status, data = gw.call("GET", "/admin/usage")
            usage = json.loads(data).get("data", []) if status == 200 else []
            if usage and all(p.get("in_flight", 0) == 0 and p.get("reserved_tokens", 0) == 0 for p in usage):
                break
            time.sleep(0.5)
        leaked = [p for p in usage if p.get("in_flight") or p.get("reserved_tokens")]
        if leaked:
            self.failures.append(f"slots or reservations left after the load: {leaked}")
        time.sleep(1.5)  # the access log is written by a background thread
        access = {}
        dropped = 0
        with open(os.path.join(self.workdir, "access.log"), errors="replace") as f:
            for line in f:
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if obj.get("event") == "access_log_dropped":
                    dropped += obj.get("dropped", 0)
                rid = obj.get("request_id") or ""
                if rid.startswith("soak-"):
                    access[rid] = obj
        port_engine = {e.port: e.idx for e in self.engines}
        name_engine = {e.name: e.idx for e in self.engines}
        recs = self.records
        for r in recs:
            r.access = access.get(r.rid)
            if r.access and r.access.get("backend"):
                r.engine = port_engine.get(int(r.access["backend"].rsplit(":", 1)[1]))
            elif r.instance:
                r.engine = name_engine.get(r.instance)

        # 1+2: outcomes
        unaccounted = []
        for r in recs:
            if r.outcome in ("ok", "aborted"):
                continue
            if r.outcome in ("error", "cut") and r.engine is not None:
                for f in self.faults:
                    if f["engine"] != r.engine:
                        continue
                    if f["kind"] == "stall":
                        hit = f["t_start"] <= r.end and r.start <= f["t_end"] + 0.2
                    else:
                        hit = r.start <= f["t_start"] <= r.end
                    if hit and r.outcome == "cut":
                        hit = f["kind"] != "stall" and r.t_head is not None
                    if hit:
                        r.accounted_by = f
                        break
            if r.accounted_by is None:
                unaccounted.append(r)
        for r in unaccounted[:20]:
            self.failures.append(
                f"request {r.rid} ({r.kind}, {r.user}) {r.outcome}: {r.detail}; engine "
                f"{'e%d' % r.engine if r.engine is not None else '-'}, {r.start:.2f}-{r.end:.2f} s")
        if len(unaccounted) > 20:
            self.failures.append(f"... {len(unaccounted) - 20} more unaccounted requests")

        # 3: quota
        per_user_gw = {}
        for p in usage:
            per_user_gw[p.get("user")] = per_user_gw.get(p.get("user"), 0) + p.get("quota_used", 0)
        expected = {}
        breakdown = {}
        missing, usage_mismatch, refund_violations, estimate_mismatch = [], [], [], []
        for r in recs:
            a = r.access
            if a is None:
                missing.append(r.rid)
                continue
            logged = (a.get("prompt_tokens") or 0) + (a.get("completion_tokens") or 0)
            b = breakdown.setdefault(r.user, {"completed": 0, "estimated": 0, "reported_unfinished": 0})
            if r.outcome == "ok":
                want = sum(r.expected)
                if a.get("usage") != "reported" or (a.get("prompt_tokens"), a.get("completion_tokens") or 0) != r.expected:
                    usage_mismatch.append(f"{r.rid}: access {a.get('usage')} "
                                          f"({a.get('prompt_tokens')}, {a.get('completion_tokens')}) != engine {r.expected}")
                expected[r.user] = expected.get(r.user, 0) + want
                b["completed"] += want
            else:
                if r.t_head is None or (r.status is not None and r.status >= 400):
                    if logged:
                        refund_violations.append(f"{r.rid}: {r.detail} but {logged} tokens settled")
                expected[r.user] = expected.get(r.user, 0) + logged
                p, c = a.get("prompt_tokens"), a.get("completion_tokens")
                if a.get("usage") == "estimated":
                    b["estimated"] += logged
                    # docs/limits.md: the prompt estimate (body bytes / 4, rounded up) plus the
                    # delta events relayed (the role chunk counts as one)
                    if p != -(-r.body_len // 4) or not (r.chunks + 1 <= c <= r.expected[1] + 1):
                        estimate_mismatch.append(
                            f"{r.rid}: estimated ({p}, {c}) for a {r.body_len}-byte body, "
                            f"{r.chunks} tokens seen, engine {r.expected}")
                elif logged:
                    b["reported_unfinished"] += logged
                    if (p, c or 0) != r.expected:
                        usage_mismatch.append(f"{r.rid} ({r.outcome}): access reported ({p}, {c}) != engine {r.expected}")
        if dropped:
            self.failures.append(f"the access log dropped {dropped} lines")
        if missing:
            self.failures.append(f"{len(missing)} requests have no access-log line, e.g. {missing[:5]}")
        for m in usage_mismatch[:10]:
            self.failures.append(f"usage mismatch {m}")
        for m in estimate_mismatch[:10]:
            self.failures.append(f"estimate not as documented: {m}")
        for m in refund_violations[:10]:
            self.failures.append(f"not refunded: {m}")
        quota_rows = []
        for user in sorted(set(expected) | {u for u in per_user_gw if u in USER_KEYS or u == ROT_USER}):
            got, want = per_user_gw.get(user, 0), expected.get(user, 0)
            quota_rows.append((user, got, want, breakdown.get(user, {})))
            if got != want:
                self.failures.append(f"quota of {user}: /admin/usage {got} != expected {want} ({breakdown.get(user)})")
        self.figures["quota"] = quota_rows

        # 4: resources
        fds0, rss0 = self.figures["before"]
        fds1, rss1, _ = self.figures["after"]
        if not within((fds0, rss0), (fds1, rss1)):
            self.failures.append(f"resources not back: fds {fds0} -> {fds1}, RSS {rss0} -> {rss1} KiB")

        # 5: operations, gateway health
        for o in self.ops:
            if not o["ok"]:
                self.failures.append(f"{o['kind']} at {o['t']:.1f} s failed: {o['detail']}")
        log_text = gw.stderr()
        if "panicked" in log_text:
            self.failures.append("the gateway log has a panic: " + log_text[log_text.index("panicked") - 200:][:600])
        self.figures["unaccounted"] = len(unaccounted)
        self.figures["dropped"] = dropped

    # -- report
    def report(self):
        recs = self.records
        main = [r for r in recs if r.phase == "main"]
        kinds = ["chat", "embed", "stream", "stream_usage", "abort", "slow_send", "slow_send_embed", "slow_read"]
        print()
        print(f"## infergate soak: {self.figures.get('main_s', 0):.0f} s with faults "
              f"(+ {self.args.warmup:.0f} s warm-up), seed {self.args.seed}")
        print()
        print("| requests (all phases) | total | ok | aborted | error (OpenAI) | cut | hung | wrong / bad shape | unaccounted |")
        print("|---|---|---|---|---|---|---|---|---|")
        for kind in kinds + ["all"]:
            rs = recs if kind == "all" else [r for r in recs if r.kind == kind]
            if not rs:
                continue
            c = lambda o: sum(1 for r in rs if r.outcome == o)  # noqa: E731
            un = sum(1 for r in rs if r.outcome not in ("ok", "aborted") and r.accounted_by is None)
            print(f"| {kind} | {len(rs)} | {c('ok')} | {c('aborted')} | {c('error')} | {c('cut')} | "
                  f"{c('hung')} | {c('wrong') + c('badshape')} | {un} |")
        print()
        aborted = sum(1 for r in recs if r.outcome == "aborted")
        print(f"client aborts: {aborted} of {len(recs)} requests ({100.0 * aborted / max(1, len(recs)):.1f} %); "
              f"during the faulted phase: {len(main)} requests, "
              f"{len(main) / max(1e-9, self.figures.get('main_s', 1)):.1f} req/s")
        errs = {}
        for r in recs:
            if r.outcome in ("error", "cut"):
                key = (r.outcome, r.detail.split(" after ")[0] if r.outcome == "error" else r.detail.split(":")[0],
                       r.accounted_by["kind"] if r.accounted_by else "UNACCOUNTED")
                errs[key] = errs.get(key, 0) + 1
        if errs:
            print()
            print("| failed requests | what | accounted by | count |")
            print("|---|---|---|---|")
            for (o, what, by), n in sorted(errs.items(), key=lambda kv: -kv[1]):
                print(f"| {o} | {what} | {by} | {n} |")
        print()
        print("| faults injected | count |")
        print("|---|---|")
        for kind in ("kill", "stall", "restart"):
            print(f"| engine {kind} | {sum(1 for f in self.faults if f['kind'] == kind)} |")
        op_kinds = sorted({o["kind"] for o in self.ops})
        for k in op_kinds:
            n = sum(1 for o in self.ops if o["kind"] == k)
            bad = sum(1 for o in self.ops if o["kind"] == k and not o["ok"])
            print(f"| {k} | {n}{f' ({bad} failed)' if bad else ''} |")
        print()
        print("| latency of completed requests (faulted phase) | n | p50 ms | p99 ms | max ms |")
        print("|---|---|---|---|---|")
        for kind in kinds:
            d = sorted((r.end - r.start) * 1000 for r in main if r.kind == kind and r.outcome == "ok")
            if d:
                print(f"| {kind} | {len(d)} | {pct(d, 50):.1f} | {pct(d, 99):.1f} | {d[-1]:.1f} |")
        ttft = sorted((r.t_first - r.start) * 1000 for r in main
                      if r.kind in ("stream", "stream_usage") and r.outcome == "ok" and r.t_first)
        if ttft:
            print(f"| stream time to first token | {len(ttft)} | {pct(ttft, 50):.1f} | {pct(ttft, 99):.1f} | {ttft[-1]:.1f} |")
        longest = max(((r.end - r.start), r) for r in recs) if recs else None
        if longest:
            print(f"| longest request (any outcome) | 1 | | | {longest[0] * 1000:.0f} ({longest[1].kind}, {longest[1].outcome}) |")
        print()
        before, after = self.figures.get("before"), self.figures.get("after")
        if before and after:
            peak_fds = max((s[1] or 0) for s in self.samples) if self.samples else None
            peak_rss = max((s[2] or 0) for s in self.samples) if self.samples else None
            peak_thr = max((s[3] or 0) for s in self.samples) if self.samples else None
            print("| gateway resources | after warm-up (idle) | peak under load | after the load (idle) | bound | ok |")
            print("|---|---|---|---|---|---|")
            fb = max(before[0] * RESOURCE_RATIO, before[0] + FD_SLACK)
            print(f"| open fds | {before[0]} | {peak_fds} | {after[0]} | <= {fb:.0f} | "
                  f"{'yes' if after[0] is not None and after[0] <= fb else 'NO'} |")
            rb = before[1] * RESOURCE_RATIO
            print(f"| RSS KiB | {before[1]} | {peak_rss} | {after[1]} | <= {rb:.0f} | "
                  f"{'yes' if after[1] is not None and after[1] <= rb else 'NO'} |")
            print(f"| threads | | {peak_thr} | {self.figures.get('threads_after')} | | |")
            print(f"\n(after the load: measured {after[2]:.0f} s after it stopped)")
        if self.figures.get("quota"):
            print()
            print("| quota per user | /admin/usage quota_used | expected | completed (engine usage) | "
                  "unfinished, estimated | unfinished, reported | equal |")
            print("|---|---|---|---|---|---|---|")
            for user, got, want, b in self.figures["quota"]:
                print(f"| {user} | {got} | {want} | {b.get('completed', 0)} | {b.get('estimated', 0)} | "
                      f"{b.get('reported_unfinished', 0)} | {'yes' if got == want else 'NO'} |")
        print()
        if self.failures:
            print(f"FAILED: {len(self.failures)} check(s)")
            for f in self.failures:
                print(f"  - {f}")
            print(f"work dir kept: {self.workdir}")
        else:
            print("PASSED: every failure OpenAI-shaped and on a faulted engine, none hung, "
                  "quota = engine usage, fds and RSS back")
        if self.args.json:
            out = {
                "figures": {k: v for k, v in self.figures.items()},
                "faults": self.faults, "ops": self.ops, "failures": self.failures,
                "samples": self.samples,
                "outcomes": {o: sum(1 for r in recs if r.outcome == o)
                             for o in ("ok", "aborted", "error", "cut", "hung", "wrong", "badshape")},
                "requests": len(recs),
            }
            with open(self.args.json, "w") as f:
                json.dump(out, f, indent=1, default=str)


def within(before, after):
    fds0, rss0 = before
    fds1, rss1 = after
    if None in (fds0, rss0, fds1, rss1):
        return False
    return fds1 <= max(fds0 * RESOURCE_RATIO, fds0 + FD_SLACK) and rss1 <= rss0 * RESOURCE_RATIO


def pct(sorted_values, p):
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=600, help="seconds of load with faults (600)")
    ap.add_argument("--warmup", type=float, default=10, help="seconds of load before the baseline (10)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the request mix (1)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    args = ap.parse_args()
    for b in ("infergate", "mock-engine"):
        if not os.access(os.path.join(BIN, b), os.X_OK):
            sys.exit(f"{os.path.join(BIN, b)} missing: cargo build --release --bins")
    soak = Soak(args)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        soak.run()
    except KeyboardInterrupt:
        soak.failures.append("interrupted")
    except Exception as e:  # noqa: BLE001 - report whatever broke the run itself
        soak.failures.append(f"the soak itself failed: {type(e).__name__}: {e}")
        import traceback
        traceback.print_exc()
    finally:
        soak.stop_faults.set()
        soak.stop_load.set()
        soak.stop_all()
    soak.report()
    if not soak.failures and not args.keep:
        shutil.rmtree(soak.workdir, ignore_errors=True)
    sys.exit(1 if soak.failures else 0)


if __name__ == "__main__":
    main()
