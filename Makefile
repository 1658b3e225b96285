# Everyday commands. `make run` and `make test` work on a fresh Debian machine
# with the Rust toolchain: they install what is missing first.
SHELL := /bin/bash
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CARGO ?= cargo

.PHONY: setup build run test unit lint check-conf real-engine smoke bench fmt clean

## setup: system packages the build and the test suites need (cmake for Pingora)
setup:
	@missing=""; \
	command -v cmake >/dev/null || missing="$$missing cmake"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx-light"; \
	python3 -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
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

## test: everything CI runs — lint, unit + integration tests, config check, real llama.cpp suite, benchmark smoke
test: build lint unit check-conf real-engine smoke

unit:
	$(CARGO) test --release --workspace

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

check-conf:
	@for f in conf/*.yaml; do target/release/infergate --check --config "$$f" || exit 1; done

## real-engine: infergate in front of a real llama.cpp server, driven by the openai SDK
real-engine: build
	tests/real-engine/run.sh

## smoke: short gateway vs direct vs nginx run with ratio checks (CI)
smoke: build
	load-tests/smoke.sh

## bench: the full side-by-side benchmark (writes load-tests/results/*.json)
bench: build
	load-tests/bench.sh

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
