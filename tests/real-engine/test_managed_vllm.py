"""infergate starts a REAL vLLM (CPU build) itself (`kind: vllm`, the built-in command
template) on the first request and serves chat completions through it, plain and
streaming, driven by the official `openai` SDK; prints the cold start of the first
request against the engine's own start as infergate logs it; then an admin unload
stops vLLM's whole process group.

Opt-in and heavy (~6.5 GB, ~25 s vLLM start, ~4.5 GB RSS): run it through
./vllm-run.sh (`make e2e-vllm`), which runs vllm-setup.sh first. Anywhere else it skips
when the vLLM venv or model is missing (INFERGATE_VLLM_REQUIRED=1 turns that into a
failure, as vllm-run.sh does).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GATEWAY_BIN = Path(os.environ.get("INFERGATE_BIN") or REPO / "target/release/infergate")
VHOME = Path(os.environ.get("INFERGATE_VLLM_HOME") or Path.home() / ".cache" / "infergate-vllm")
VPY = VHOME / "venv" / "bin" / "python"
MODEL_DIR = VHOME / "models" / "tiny-qwen2-hf"
MODEL = "tiny-qwen2"
STARTUP_TIMEOUT_S = 300

_missing = [str(p) for p in (VPY, MODEL_DIR / "model.safetensors", GATEWAY_BIN) if not p.exists()]
if _missing:
    why = f"vLLM e2e: missing {', '.join(_missing)}; run tests/real-engine/vllm-run.sh (make e2e-vllm)"
    if os.environ.get("INFERGATE_VLLM_REQUIRED") == "1":
        raise RuntimeError(why)
    pytest.skip(why, allow_module_level=True)

import openai  # noqa: E402  (only in the vLLM venv; after the skip on purpose)


def _get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, json.loads(r.read() or b"null")


def _group_members(pgid):
    """PIDs (not zombies) whose process group is `pgid`: vLLM runs its engine core
    as a child process, which must go with it."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # after "pid (comm)": state ppid pgrp ...
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(d.name))
    return out


def _tail(path, n=40):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"({path}: {e})"


def _read_line(proc, what, timeout=30):
    """One stdout line of the gateway, or a clear failure if it exits first."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        raise AssertionError(f"the gateway printed no {what} line in {timeout} s")
    line = proc.stdout.readline().decode().strip()
    if not line:
        raise AssertionError(f"the gateway exited (code {proc.poll()}) before printing its {what} line")
    return line


def test_infergate_starts_vllm_on_first_request_and_unloads_it():
    tmp = Path(tempfile.mkdtemp(prefix="infergate-vllm-"))
    engine_log = tmp / "engine-logs" / f"{MODEL}.log"
    (tmp / "gw.yaml").write_text(f"""
server: {{ listen: "127.0.0.1:0", admin_listen: "127.0.0.1:0", threads: 2, grace_period: 1s }}
engines:
  port_range: "21900-21999"
  log_dir: {tmp / 'engine-logs'}
  stop_grace: 20s
  python: {VPY}
  models:
    - name: {MODEL}
      kind: vllm
      path: {MODEL_DIR}
      env: {{VLLM_CPU_KVCACHE_SPACE: "1", HF_HUB_OFFLINE: "1", TRANSFORMERS_OFFLINE: "1",
             VLLM_NO_USAGE_STATS: "1", DO_NOT_TRACK: "1"}}
      args: ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048"]
      startup_timeout: {STARTUP_TIMEOUT_S}s
""")
    gw_log = tmp / "gateway.log"
    log = open(gw_log, "wb")
    # bufsize=0: unbuffered stdout, so select() in _read_line sees each line
    gw = subprocess.Popen([str(GATEWAY_BIN), "-c", str(tmp / "gw.yaml")], bufsize=0,
                          stdout=subprocess.PIPE, stderr=log, env={**os.environ, "RUST_LOG": "info"})
    pid = None
    ok = False
    try:
        base = _read_line(gw, "listening").removeprefix("infergate listening on ")
        admin = _read_line(gw, "admin listening").removeprefix("infergate admin listening on ")
        _, engines = _get(f"{admin}/admin/engines")
        assert engines["data"][0]["status"] == "stopped", engines
        assert engines["data"][0]["kind"] == "vllm", engines

        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0,
                               timeout=STARTUP_TIMEOUT_S + 60)

        # 1. the first request starts vLLM and is answered by it
        t0 = time.monotonic()
        resp = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=8)
        first = time.monotonic() - t0
        assert resp.choices[0].message.content is not None, resp
        assert resp.usage.completion_tokens > 0, resp
        assert resp.usage.prompt_tokens > 5, resp  # the real Qwen2 chat template wraps "hello"
        assert resp.model == MODEL, resp
        _, engines = _get(f"{admin}/admin/engines")
        e = engines["data"][0]
        assert e["status"] == "running" and e["pid"], e
        pid = e["pid"]
        members = _group_members(pid)
        assert pid in members, (pid, members)

        # 2. streaming, with usage on a final chunk
        t1 = time.monotonic()
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "count to ten"}], max_tokens=16,
            stream=True, stream_options={"include_usage": True})
        chunks, text, finish, usage = 0, "", None, None
        for chunk in stream:
            chunks += 1
            for c in chunk.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
            usage = chunk.usage or usage
        streamed = time.monotonic() - t1
        assert chunks >= 2, chunks
        assert finish in ("stop", "length"), finish
        assert usage is not None and usage.completion_tokens > 0, usage

        # 3. a warm plain request, for what a request costs once vLLM runs
        t2 = time.monotonic()
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=8)
        warm = time.monotonic() - t2

        text_log = gw_log.read_text(errors="replace")
        m = re.search(rf"engine `{MODEL}` ready on \S+ after ([0-9.]+) s", text_log)
        assert m, f"no 'ready after' line in the gateway log:\n{text_log[-3000:]}"
        ready = float(m.group(1))
        print(f"\ncold start (vLLM {len(members)} processes): first request {first:.3f} s; "
              f"engine ready after {ready:.3f} s as seen by infergate; warm request {warm:.3f} s; "
              f"infergate adds {first - ready - warm:+.3f} s over engine start + one warm request; "
              f"stream of {chunks} chunks in {streamed:.3f} s")

        # 4. unload stops vLLM and every process of its group
        req = urllib.request.Request(f"{admin}/admin/models/{MODEL}/unload", method="POST")
        t3 = time.monotonic()
        with urllib.request.urlopen(req, timeout=90) as r:
            assert json.loads(r.read())["success"] is True
        deadline = time.monotonic() + 30
        while _group_members(pid):
            assert time.monotonic() < deadline, f"still running after unload: {_group_members(pid)}"
            time.sleep(0.1)
        print(f"unload: vLLM's process group gone {time.monotonic() - t3:.2f} s after the request")
        _, engines = _get(f"{admin}/admin/engines")
        assert engines["data"][0]["status"] == "stopped", engines
        ok = True
    finally:
        gw.send_signal(signal.SIGTERM)
        try:
            code = gw.wait(timeout=60)
        except subprocess.TimeoutExpired:
            gw.kill()
            code = "killed after 60 s"
        log.close()
        if pid:
            # infergate stops its engines on exit; clean up what this test started if it did not
            left = _group_members(pid)
            if left:
                os.killpg(pid, signal.SIGKILL)
                ok = False
                print(f"\nengine group {pid} was still there after the gateway exited: {left}")
        if not ok:
            print(f"\n--- gateway exit {code}; log {gw_log} (tail) ---\n{_tail(gw_log)}"
                  f"\n--- engine log {engine_log} (tail) ---\n{_tail(engine_log, 60)}")
        if ok and not os.environ.get("INFERGATE_VLLM_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")
    assert code == 0, f"the gateway exited with {code} on SIGTERM"
