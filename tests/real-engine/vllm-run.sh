#!/usr/bin/env bash
# vllm-run.sh — the opt-in vLLM end-to-end check (`make e2e-vllm`): set up vLLM on CPU and
# a tiny Qwen2 HF model (vllm-setup.sh: ~6.5 min and ~6.5 GB the first time), then let
# infergate start vLLM itself (`kind: vllm`) on the first request and serve the openai SDK
# through it (test_managed_vllm.py). Not part of `make test`: too heavy for every CI run.
# usage: tests/real-engine/vllm-run.sh [extra pytest args]
# env:   INFERGATE_BIN        gateway binary (default <repo>/target/release/infergate)
#        INFERGATE_VLLM_HOME  vLLM venv + model (default $HOME/.cache/infergate-vllm)
#        INFERGATE_RE_HOME    where setup.sh keeps the Qwen2 vocab GGUF
#        INFERGATE_VLLM_KEEP  keep the temp dir with the gateway config and logs
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
export INFERGATE_VLLM_HOME=${INFERGATE_VLLM_HOME:-$HOME/.cache/infergate-vllm}
export INFERGATE_BIN=${INFERGATE_BIN:-$REPO/target/release/infergate}

"$HERE/vllm-setup.sh"

if [ ! -x "$INFERGATE_BIN" ]; then
  echo "vllm-run.sh: gateway binary $INFERGATE_BIN is missing; build it with 'make build'" >&2
  exit 1
fi

cd "$HERE"
export PYTHONDONTWRITEBYTECODE=1
# the test must run, not skip, when called from here
export INFERGATE_VLLM_REQUIRED=1
# -s: show the cold-start timing line; -p no:cacheprovider: no .pytest_cache in the tree
exec timeout 1200 "$INFERGATE_VLLM_HOME/venv/bin/python" -m pytest -q -s -p no:cacheprovider \
  test_managed_vllm.py "$@"
