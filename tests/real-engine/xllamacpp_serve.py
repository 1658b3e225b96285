#!/usr/bin/env python3
# adapted from the team's engine recipe (shared/engines/xllamacpp_serve.py)
"""Run llama.cpp's native HTTP server (embedded in the prebuilt `xllamacpp` wheel)
on HOST:PORT until SIGTERM/SIGINT (or, with --exit-on-stdin-eof, until its
standard input closes, so it never outlives the test process that started it).
No compiler needed.

The first line on stdout is the bound address alone, e.g. `127.0.0.1:43125`
(port 0, the default, picks a free port).  Everything else goes to stderr.

usage: xllamacpp_serve.py MODEL.gguf [--host 127.0.0.1] [--port 0]
                          [--alias tiny-qwen2] [--ctx 4096] [--parallel 2]
                          [--threads 2] [--embedding] [--pooling mean] [--n-predict N]
                          [--exit-on-stdin-eof]
"""
import argparse
import os
import signal
import sys
import threading

import xllamacpp as xlc


def bound_address(server, host):
    """`listening_address` as HOST:PORT whatever form this xllamacpp reports it in."""
    addr = server.listening_address
    if isinstance(addr, (tuple, list)):
        return f"{addr[0]}:{addr[1]}"
    addr = str(addr).strip()
    for prefix in ("http://", "https://"):
        if addr.startswith(prefix):
            addr = addr[len(prefix):]
    addr = addr.rstrip("/")
    if ":" not in addr:
        addr = f"{host}:{addr}"
    return addr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--alias", default=None)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--embedding", action="store_true")
    ap.add_argument("--pooling", default=None, choices=[None, "none", "mean", "cls", "last"])
    ap.add_argument("--exit-on-stdin-eof", action="store_true")
    ap.add_argument("--n-predict", type=int, default=-1,
                    help="tokens generated per request unless it says (-1: until EOS or the context ends)")
    a = ap.parse_args()

    p = xlc.CommonParams()
    p.model.path = a.model
    p.hostnames = [a.host]
    p.port = a.port
    p.n_ctx = a.ctx
    p.n_parallel = a.parallel
    p.cpuparams.n_threads = a.threads
    p.cpuparams_batch.n_threads = a.threads
    p.n_predict = a.n_predict
    p.endpoint_metrics = True
    p.endpoint_props = True
    p.endpoint_slots = True
    p.use_jinja = True
    if a.alias:
        p.model_alias = {a.alias}
    if a.embedding:
        p.embedding = True
    if a.pooling:
        p.pooling_type = getattr(xlc.llama_pooling_type, "LLAMA_POOLING_TYPE_" + a.pooling.upper())

    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())

    server = xlc.Server(p)  # loads the model and starts the HTTP listener
    try:
        print(bound_address(server, a.host), flush=True)
    except (BrokenPipeError, OSError):
        stop.set()  # whoever started us is gone

    if a.exit_on_stdin_eof:
        def watch_stdin():
            try:
                while sys.stdin.buffer.read(4096):
                    pass
            except (OSError, ValueError):
                pass
            stop.set()

        threading.Thread(target=watch_stdin, daemon=True).start()

    while not stop.wait(0.5):
        pass
    # The server's C++ threads can keep the interpreter from finishing: tear the
    # server down under a watchdog, then leave without the interpreter's finalisation.
    threading.Timer(10.0, lambda: os._exit(1)).start()
    del server
    os._exit(0)


if __name__ == "__main__":
    main()
