"""The official `openai` SDK against infergate's limits (mock engine upstream).

- A requests-per-second 429 carries `Retry-After`; the SDK waits and retries on
  its own and the call succeeds (with retries off, the same call raises
  RateLimitError: the retry is what recovered it).
- An exhausted quota is `insufficient_quota` with `x-should-retry: false`: the
  SDK gives up at once, without retrying.
- A stream the client did not ask usage for shows no usage chunk, although
  infergate asked the engine for one to count tokens.

Run through ./run.sh (it prepares the venv with the SDK). Environment:
  INFERGATE_BIN   gateway binary (default <repo>/target/release/infergate);
                  mock-engine is taken from the same directory.
"""
import json
import os
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import openai
import pytest

REPO = Path(__file__).resolve().parents[2]
GATEWAY_BIN = Path(os.environ.get("INFERGATE_BIN") or REPO / "target/release/infergate")
MOCK_BIN = GATEWAY_BIN.parent / "mock-engine"

KEY = "sk-sdk-limits-0123456789abcdef012345"
QUOTA_KEY = "sk-sdk-quota-0123456789abcdef0123456"


def _first_line(proc, what, deadline_s=30):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if line:
            return line.decode().strip()
        if proc.poll() is not None:
            break
    raise RuntimeError(f"{what} did not start")


def _get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def gateway():
    tmp = Path(tempfile.mkdtemp(prefix="infergate-sdk-"))
    engine = subprocess.Popen(
        [str(MOCK_BIN), "--listen", "127.0.0.1:0", "--model", "tiny-chat", "--tokens", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    engine_addr = _first_line(engine, "mock-engine")
    (tmp / "keys.json").write_text(json.dumps({"keys": [
        {"key": KEY, "user": "sdk", "limits": {"requests_per_second": 1, "burst": 1}},
        {"key": QUOTA_KEY, "user": "sdk-quota", "quota": 1},
    ]}))
    (tmp / "gw.yaml").write_text(f"""
server: {{ listen: "127.0.0.1:0", threads: 2 }}
pools:
  - name: chat
    models: [tiny-chat]
    backends: ["{engine_addr}"]
    health_check: {{ path: /health, interval: 200ms }}
filters:
  - request_id: {{}}
  - auth: {{ api_keys_file: {tmp / 'keys.json'} }}
  - limits: {{ data_dir: {tmp / 'data'} }}
""")
    log = open(tmp / "gateway.log", "wb")
    gw = subprocess.Popen([str(GATEWAY_BIN), "-c", str(tmp / "gw.yaml")],
                          stdout=subprocess.PIPE, stderr=log)
    line = _first_line(gw, "infergate")
    base = line.removeprefix("infergate listening on ")
    end = time.monotonic() + 20
    while _get(f"{base}/health")["healthy_services"] != "1/1":
        assert time.monotonic() < end, "backend never became healthy"
        time.sleep(0.05)
    yield {"base": base, "engine": f"http://{engine_addr}", "log": tmp / "gateway.log"}
    for p in (gw, engine):
        p.kill()
        p.wait()
    log.close()


def _client(gw, key=KEY, **kw):
    return openai.OpenAI(base_url=f"{gw['base']}/v1", api_key=key, **kw)


def _chat(client, **kw):
    return client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "hi"}], **kw)


def test_sdk_recovers_from_requests_per_second_429_by_its_own_retry(gateway):
    time.sleep(1.1)  # a full bucket
    _chat(_client(gateway, max_retries=0))
    # without retries the next call within the second is refused ...
    with pytest.raises(openai.RateLimitError) as refused:
        _chat(_client(gateway, max_retries=0))
    err = refused.value
    assert err.status_code == 429
    assert err.body["code"] == "rate_limit_exceeded"
    assert err.body["type"] == "requests"
    assert int(err.response.headers["retry-after"]) >= 1
    # ... and with the SDK's default retries the same call succeeds after waiting
    before = _get(f"{gateway['engine']}/mock/stats")["requests"]
    started = time.monotonic()
    raw = _client(gateway).chat.completions.with_raw_response.create(
        model="tiny-chat", messages=[{"role": "user", "content": "hi"}])
    waited = time.monotonic() - started
    assert raw.parse().choices[0].message.content
    assert raw.retries_taken >= 1, "the SDK retried"
    assert waited >= 0.5, f"it honoured Retry-After (waited {waited:.2f}s)"
    assert raw.headers["x-ratelimit-limit-requests"] == "1"
    # the refused attempts never reached the engine
    assert _get(f"{gateway['engine']}/mock/stats")["requests"] == before + 1


def test_sdk_does_not_retry_an_exhausted_quota(gateway):
    client = _client(gateway, key=QUOTA_KEY)
    _chat(client)  # uses more than the 1-token quota
    started = time.monotonic()
    raw_client = client.with_options(max_retries=2)
    with pytest.raises(openai.RateLimitError) as refused:
        _chat(raw_client)
    assert time.monotonic() - started < 0.4, "no retry back-off happened"
    assert refused.value.body["code"] == "insufficient_quota"
    assert refused.value.response.headers["x-should-retry"] == "false"


def test_sdk_stream_shows_no_injected_usage_chunk(gateway):
    time.sleep(1.1)
    chunks = list(_chat(_client(gateway), stream=True))
    assert chunks, "the stream had chunks"
    assert all(c.choices for c in chunks), "no usage-only chunk with empty choices"
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks)
    # the engine was asked for usage (for accounting)
    last = _get(f"{gateway['engine']}/mock/last-request")
    assert last["stream_options"] == {"include_usage": True}
