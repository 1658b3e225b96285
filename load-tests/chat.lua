-- wrk script for load-tests/bench.sh: a small non-streaming chat completion POST.
-- Only static request fields are set (no request()/response() functions), so wrk
-- keeps its fast path; done() prints one machine-readable summary line.
-- env BENCH_BODY overrides the JSON body.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
-- the key of the "gateway-auth" target; the other targets ignore it
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY")
  or "sk-bench-0000000000000000000000000000")
wrk.body = os.getenv("BENCH_BODY")
  or '{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"max_tokens":8}'

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"max":%d,' ..
    '"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
