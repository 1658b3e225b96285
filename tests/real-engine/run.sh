#!/usr/bin/env bash
# run.sh — the real-engine suite: set up llama.cpp (xllamacpp) + models, then drive
# infergate in front of it with the official openai SDK (test_real_engine.py).
# usage: tests/real-engine/run.sh [extra pytest args, e.g. -k embeddings -x]
# env:   INFERGATE_BIN      gateway binary (default <repo>/target/release/infergate)
#        INFERGATE_RE_HOME  venv + models (default ${XDG_CACHE_HOME:-$HOME/.cache}/infergate-real-engine)
#        INFERGATE_RE_KEEP  keep the temp dir with the gateway config and all logs
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
export INFERGATE_RE_HOME=${INFERGATE_RE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/infergate-real-engine}
export INFERGATE_BIN=${INFERGATE_BIN:-$REPO/target/release/infergate}

"$HERE/setup.sh"

if [ ! -x "$INFERGATE_BIN" ]; then
  echo "run.sh: gateway binary $INFERGATE_BIN is missing; build it with 'cargo build --release --bins'" >&2
  exit 1
fi

cd "$HERE"
export PYTHONDONTWRITEBYTECODE=1
# -p no:cacheprovider: leave no .pytest_cache in the source tree
exec timeout 900 "$INFERGATE_RE_HOME/venv/bin/python" -m pytest -q -p no:cacheprovider \
  test_real_engine.py test_sdk_limits.py test_managed_engine.py "$@"
