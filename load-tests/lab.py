"""The processes of a ladder run: upstreams, proxies and their bookkeeping.

One `Lab` starts everything on 127.0.0.1 (ports picked free), knows each
target's URLs and process ids (for CPU and memory), and stops everything it
started on exit, Ctrl-C included. Only the Python standard library is used.
"""
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BIN = os.environ.get("LADDER_BIN_DIR", os.path.join(REPO, "target", "release"))
BENCH_KEY = "sk-bench-0000000000000000000000000000"
AUTH_HEADER = f"Authorization: Bearer {BENCH_KEY}"
# the upstream roles and the model name each mock serves
UPSTREAMS = {"chat": "mock-model", "stream": "mock-stream", "hold": "mock-hold", "abort": "mock-abort"}
STREAM_INTERVAL_MS = 10
STREAM_TOKENS = 16
GATEWAY_VARIANTS = ["all", "no-auth", "no-limits", "no-access-log", "no-filters"]


def log(msg):
    print(f"[ladder {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_body(model, stream=False, max_tokens=8):
    b = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    if stream:
        b = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    return json.dumps(b, separators=(",", ":"))


def post(addr, body, timeout=5.0):
    """POST a chat completion; (status, body) or (None, error)."""
    host, port = addr.rsplit(":", 1)
    try:
        c = http.client.HTTPConnection(host, int(port), timeout=timeout)
        c.request("POST", "/v1/chat/completions", body=body,
                  headers={"Content-Type": "application/json",
                           "Authorization": f"Bearer {BENCH_KEY}"})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, data
    except OSError as e:
        return None, str(e).encode()


def cpu_seconds(pids):
    """user + sys CPU seconds of the processes (all their threads)."""
    tck = os.sysconf("SC_CLK_TCK")
    t = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            t += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return t / tck


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total



def goal(scenario, name, ok, detail):
    """One row of a benchmark's goals table: PASS, FAIL or n/a (ok is None)."""
    return {"scenario": scenario, "goal": name, "status": "n/a" if ok is None else ("PASS" if ok else "FAIL"),
            "detail": detail}


def fmt(x, nd=1):
    """A table cell: – for nothing, thousands separators, nd decimals for floats."""
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def finish(res, base, started, end_binaries, goals, markdown, check, log):
    """The common end of a benchmark run: note the load and any rebuilt binary,
    evaluate the goals, write BASE.json and BASE.md, print the report; returns
    the exit status (1 with --check when a goal did not pass)."""
    meta = res["meta"]
    meta["loadavg_end"] = os.getloadavg()
    if end_binaries != meta["binaries"]:
        meta["binaries_changed"] = end_binaries
        log("WARNING: a binary in target/release changed during the run (rebuilt); figures may mix builds")
    meta["duration_s"] = time.time() - started
    res["goals"] = goals(res["results"])
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=1, default=str)
        f.write("\n")
    md = markdown(res)
    with open(base + ".md", "w") as f:
        f.write(md)
    print(md)
    log(f"results: {base}.json, {base}.md; done in {meta['duration_s']:.0f} s")
    bad = [g for g in res["goals"] if g["status"] != "PASS"]
    if check and bad:
        for g in bad:
            log(f"goal {g['status']}: {g['scenario']}: {g['goal']} ({g['detail']})")
        return 1
    return 0

class Target:
    """Something the client talks to: a base address per upstream role and
    the pids whose CPU and memory count as the proxy's."""

    def __init__(self, name, kind, addrs, pids):
        self.name, self.kind, self.addrs, self.pids = name, kind, addrs, pids

    def url(self, role):
        return f"http://{self.addrs[role]}/v1/chat/completions"


class Lab:
    def __init__(self, threads=2, pin=True, keep=False):
        self.threads = threads
        self.keep = keep
        self.work = tempfile.mkdtemp(prefix="infergate-ladder.")
        self.procs = []  # (Popen, stop signal)
        self.targets = {}
        self.upstream = {}  # role -> addr
        self.mock_pids = []
        cpus = sorted(os.sched_getaffinity(0))
        self.client_pin, self.mock_pin = [], []
        self.pinning = "none"
        if pin and len(cpus) >= 2 and shutil.which("taskset"):
            self.client_pin = ["taskset", "-c", str(cpus[0])]
            self.mock_pin = ["taskset", "-c", str(cpus[-1])]
            self.pinning = f"mocks on CPU {cpus[-1]}, clients (wrk, loadgen) on CPU {cpus[0]}, proxies unpinned"
        self.nginx_version = None

    # -------------------------------------------------------------- processes
    def spawn(self, name, argv, stop=signal.SIGTERM, stdin=None):
        out = open(os.path.join(self.work, f"{name}.out"), "w")
        err = open(os.path.join(self.work, f"{name}.err"), "w")
        p = subprocess.Popen(argv, stdout=out, stderr=err, stdin=stdin or subprocess.DEVNULL)
        self.procs.append((p, stop))
        return p

    def first_line(self, name, proc, timeout=30):
        path = os.path.join(self.work, f"{name}.out")
        deadline = time.time() + timeout
        while time.time() < deadline:
            with open(path) as f:
                line = f.readline().strip()
            if line:
                return line
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{name} printed no ready line; see {self.work}/{name}.err")

    def stop_all(self):
        for p, sig in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(sig)
                except OSError:
                    pass
        deadline = time.time() + 5
        for p, _ in self.procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        if self.keep:
            log(f"work dir kept: {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    def wait_routed(self, addr, model, proc, what, timeout=30):
        deadline = time.time() + timeout
        body = chat_body(model)
        while time.time() < deadline:
            status, data = post(addr, body)
            if status == 200 and b"chat.completion" in data:
                return
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what} exited; see {self.work}")
            time.sleep(0.1)
        raise RuntimeError(f"{what} did not answer 200 for {model} within {timeout}s")

    # -------------------------------------------------------------- upstreams
    def start_upstreams(self):
        knobs = {
            "chat": ["--token-interval-ms", "0"],
            "stream": ["--token-interval-ms", str(STREAM_INTERVAL_MS), "--tokens", str(STREAM_TOKENS)],
            "hold": ["--token-interval-ms", "3600000", "--tokens", "2"],
        }
        for role, extra in knobs.items():
            name = f"mock-{role}"
            p = self.spawn(name, self.mock_pin + [
                os.path.join(BIN, "mock-engine"), "--listen", "127.0.0.1:0", "--model", UPSTREAMS[role],
                "--threads", "1", "--ttft-ms", "0"] + extra)
            addr = self.first_line(name, p)
            self.wait_routed(addr, UPSTREAMS[role], p, name)
            self.upstream[role] = addr
            self.mock_pids.append(p.pid)
        # the abort upstream is `loadgen abort` itself, started per measurement
        self.upstream["abort"] = f"127.0.0.1:{free_port()}"
        self.targets["direct"] = Target("direct", "direct", dict(self.upstream), [])
        log(f"mocks: {self.upstream}")

    # -------------------------------------------------------------- proxies
    def start_nginx(self):
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        d = os.path.join(self.work, "nginx")
        os.makedirs(os.path.join(d, "logs"), exist_ok=True)
        os.makedirs(os.path.join(d, "tmp"), exist_ok=True)
        self.nginx_version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()
        ports = {role: free_port() for role in UPSTREAMS}
        servers = []
        for role, port in ports.items():
            servers.append(f"""
  upstream up_{role} {{ server {self.upstream[role]}; keepalive 1024; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    client_max_body_size 32m;
    location / {{
      proxy_pass http://up_{role};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 300s;
    }}
  }}""")
        conf = f"""# written by load-tests/lab.py
worker_processes {self.threads};
worker_rlimit_nofile 19500;
daemon off;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 16000; }}
http {{
  access_log {d}/logs/access.log combined buffer=64k flush=1s;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  keepalive_requests 1000000;
  keepalive_timeout 75s;{''.join(servers)}
}}
"""
        path = os.path.join(d, "nginx.conf")
        with open(path, "w") as f:
            f.write(conf)
        subprocess.run([nginx, "-t", "-q", "-e", f"{d}/logs/error.log", "-c", path, "-p", d], check=True)
        p = self.spawn("nginx", [nginx, "-e", f"{d}/logs/error.log", "-c", path, "-p", d])
        addrs = {role: f"127.0.0.1:{port}" for role, port in ports.items()}
        self.wait_routed(addrs["chat"], UPSTREAMS["chat"], p, "nginx")
        pids = [p.pid] + [int(x) for x in subprocess.run(
            ["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()]
        self.targets["nginx"] = Target("nginx", "nginx", addrs, pids)
        log(f"nginx pids {pids}")

    def start_passthrough(self):
        addrs, pids = {}, {}
        for role in UPSTREAMS:
            port = free_port()
            name = f"passthrough-{role}"
            p = self.spawn(name, [os.path.join(BIN, "passthrough"), "--listen", f"127.0.0.1:{port}",
                                  "--upstream", self.upstream[role], "--threads", str(self.threads)],
                           stop=signal.SIGINT)
            self.first_line(name, p)
            addrs[role] = f"127.0.0.1:{port}"
            pids[role] = p.pid
        self.wait_routed(addrs["chat"], UPSTREAMS["chat"], None, "passthrough")
        t = Target("passthrough", "passthrough", addrs, [pids["chat"]])
        t.role_pids = pids
        self.targets["passthrough"] = t

    def start_gateway(self, variant):
        src = os.path.join(HERE, "configs", f"infergate-{variant}.yaml")
        with open(src) as f:
            text = f.read()
        subst = {"@MOCK@": self.upstream["chat"], "@STREAM@": self.upstream["stream"],
                 "@HOLD@": self.upstream["hold"], "@ABORT@": self.upstream["abort"],
                 "@THREADS@": str(self.threads), "@WORK@": self.work, "@CONFIGS@": os.path.join(HERE, "configs")}
        for k, v in subst.items():
            text = text.replace(k, v)
        cfg = os.path.join(self.work, f"infergate-{variant}.yaml")
        with open(cfg, "w") as f:
            f.write(text)
        exe = os.path.join(BIN, "infergate")
        chk = subprocess.run([exe, "--check", "--config", cfg], capture_output=True, text=True, timeout=60)
        if chk.returncode != 0:
            raise RuntimeError(f"infergate --check rejected {cfg}:\n{chk.stdout}{chk.stderr}")
        name = f"infergate-{variant}"
        p = self.spawn(name, [exe, "--config", cfg], stop=signal.SIGINT)
        line = self.first_line(name, p)
        prefix = "infergate listening on http://"
        if not line.startswith(prefix):
            raise RuntimeError(f"unexpected ready line {line!r}")
        addr = line[len(prefix):].rstrip("/")
        self.wait_routed(addr, UPSTREAMS["chat"], p, name)
        self.wait_routed(addr, UPSTREAMS["stream"], p, name)
        self.wait_routed(addr, UPSTREAMS["hold"], p, name)
        self.targets[name] = Target(name, "infergate", {r: addr for r in UPSTREAMS}, [p.pid])
        log(f"{name} pid {p.pid} on {addr}")

    def target_pids(self, target, role="chat"):
        t = self.targets[target]
        if hasattr(t, "role_pids"):
            return [t.role_pids[role]]
        return t.pids
