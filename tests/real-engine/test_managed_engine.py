"""infergate starts a real llama.cpp server itself (`llama_cpp` kind) on the
first request and serves a chat completion through it, driven by the official
`openai` SDK; then measures the cold start infergate adds on top of the
engine's own start.

The engine is llama.cpp's server embedded in the `xllamacpp` wheel, started
through `xllamacpp_serve.py` (the `llama_cpp` kind with its command replaced,
since there is no `llama-server` binary on PyPI). Run through ./run.sh.
"""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GATEWAY_BIN = Path(os.environ.get("INFERGATE_BIN") or REPO / "target/release/infergate")
RE_HOME = Path(
    os.environ.get("INFERGATE_RE_HOME")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "infergate-real-engine"
)
CHAT_GGUF = RE_HOME / "models" / "tiny-qwen2.gguf"
MODEL = "tiny-qwen2"


def _get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, json.loads(r.read() or b"null")


def _engine_alone_start_seconds():
    """The engine's own start: spawn it directly and time until /health is 200."""
    t0 = time.monotonic()
    p = subprocess.Popen(
        [sys.executable, str(HERE / "xllamacpp_serve.py"), str(CHAT_GGUF),
         "--host", "127.0.0.1", "--port", "0", "--alias", MODEL, "--threads", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    try:
        addr = p.stdout.readline().decode().strip()
        while time.monotonic() - t0 < 60:
            try:
                if _get(f"http://{addr}/health", timeout=1)[0] == 200:
                    return time.monotonic() - t0
            except Exception:
                pass
            time.sleep(0.02)
        raise RuntimeError("llama.cpp did not become healthy in 60 s")
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)


def test_infergate_starts_llama_cpp_on_first_request_and_stops_it():
    tmp = Path(tempfile.mkdtemp(prefix="infergate-managed-"))
    (tmp / "gw.yaml").write_text(f"""
server: {{ listen: "127.0.0.1:0", admin_listen: "127.0.0.1:0", threads: 2, grace_period: 1s }}
engines:
  port_range: "21800-21899"
  log_dir: {tmp / 'engine-logs'}
  stop_grace: 10s
  python: {sys.executable}
  models:
    - name: {MODEL}
      kind: llama_cpp
      path: {CHAT_GGUF}
      command: ["{{python}}", "{HERE / 'xllamacpp_serve.py'}", "{{path}}", "--host", "{{host}}",
                "--port", "{{port}}", "--alias", "{{name}}", "--threads", "2"]
      startup_timeout: 120s
""")
    log = open(tmp / "gateway.log", "wb")
    gw = subprocess.Popen([str(GATEWAY_BIN), "-c", str(tmp / "gw.yaml")],
                          stdout=subprocess.PIPE, stderr=log, env={**os.environ, "RUST_LOG": "info"})
    try:
        base = gw.stdout.readline().decode().strip().removeprefix("infergate listening on ")
        admin = gw.stdout.readline().decode().strip().removeprefix("infergate admin listening on ")
        _, engines = _get(f"{admin}/admin/engines")
        assert engines["data"][0]["status"] == "stopped"

        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=180)
        t0 = time.monotonic()
        resp = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=8)
        first = time.monotonic() - t0
        assert resp.choices[0].message.content is not None
        assert resp.usage.completion_tokens > 0
        _, engines = _get(f"{admin}/admin/engines")
        e = engines["data"][0]
        assert e["status"] == "running" and e["pid"], e
        pid = e["pid"]

        # a warm request, for what a request costs once the engine runs
        t1 = time.monotonic()
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=8)
        warm = time.monotonic() - t1

        text = (tmp / "gateway.log").read_text(errors="replace")
        ready = float(re.search(r"engine `tiny-qwen2` ready on \S+ after ([0-9.]+) s", text).group(1))
        alone = _engine_alone_start_seconds()
        print(f"\ncold start: first request {first:.3f} s; engine ready after {ready:.3f} s as seen by "
              f"infergate; the engine alone reaches /health 200 in {alone:.3f} s; warm request {warm:.3f} s; "
              f"infergate adds {first - alone - warm:+.3f} s over engine start + one warm request")

        # unload stops the process
        req = urllib.request.Request(f"{admin}/admin/models/{MODEL}/unload", method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["success"] is True
        deadline = time.monotonic() + 20
        while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            assert time.monotonic() < deadline, "the engine process is still there"
            time.sleep(0.1)
    finally:
        gw.send_signal(signal.SIGTERM)
        try:
            gw.wait(timeout=30)
        except subprocess.TimeoutExpired:
            gw.kill()
        log.close()
