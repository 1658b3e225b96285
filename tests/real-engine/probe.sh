#!/bin/bash
# adapted from the team's engine recipe (shared/engines/probe.sh)
# Exercise an OpenAI-compatible server on 127.0.0.1:$PORT and print every response.
# usage: probe.sh PORT [MODEL_ID] [EMBED_PORT]
PORT=${1:?port}; MODEL=${2:-tiny-qwen2}; EPORT=${3:-}
B=http://127.0.0.1:$PORT
J='-H Content-Type:application/json'
hr() { printf '\n===== %s\n' "$*"; }

hr "GET /health";            curl -s -i -m 10 $B/health | tr -d '\r'
hr "GET /v1/models";         curl -s -m 10 $B/v1/models
hr "POST /v1/chat/completions (non-stream)"
curl -s -m 60 $B/v1/chat/completions $J -d '{"model":"'$MODEL'","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello"}],"max_tokens":8,"temperature":0,"seed":1}'
hr "POST /v1/chat/completions (stream, no include_usage)"
curl -s -N -i -m 60 $B/v1/chat/completions $J -d '{"model":"'$MODEL'","messages":[{"role":"user","content":"Say hello"}],"max_tokens":4,"temperature":0,"stream":true}' | tr -d '\r'
hr "POST /v1/chat/completions (stream, stream_options.include_usage=true)"
curl -s -N -m 60 $B/v1/chat/completions $J -d '{"model":"'$MODEL'","messages":[{"role":"user","content":"Say hello"}],"max_tokens":4,"temperature":0,"stream":true,"stream_options":{"include_usage":true}}'
hr "POST /v1/completions (non-stream)"
curl -s -m 60 $B/v1/completions $J -d '{"model":"'$MODEL'","prompt":"The quick brown fox","max_tokens":6,"temperature":0}'
hr "POST /v1/completions (stream, include_usage)"
curl -s -N -m 60 $B/v1/completions $J -d '{"model":"'$MODEL'","prompt":"The quick brown fox","max_tokens":3,"temperature":0,"stream":true,"stream_options":{"include_usage":true}}'
hr "POST /v1/chat/completions (max_tokens=0 edge / bad request)"
curl -s -i -m 30 $B/v1/chat/completions $J -d '{"model":"'$MODEL'","messages":"not-a-list"}' | tr -d '\r'
hr "POST /tokenize";         curl -s -m 10 $B/tokenize $J -d '{"content":"Hello world, this is a test."}'
hr "GET /props (first 600 chars)"; curl -s -m 10 $B/props | head -c 600
hr "GET /slots (first 400 chars)"; curl -s -m 10 $B/slots | head -c 400
hr "GET /metrics";           curl -s -i -m 10 $B/metrics | tr -d '\r'
if [ -n "$EPORT" ]; then
  E=http://127.0.0.1:$EPORT
  hr "EMBED GET /v1/models"; curl -s -m 10 $E/v1/models
  hr "EMBED POST /v1/embeddings (2 inputs, first 400 chars + usage)"
  curl -s -m 60 $E/v1/embeddings $J -d '{"model":"all-minilm-l6-v2","input":["The cat sat on the mat.","A feline rested on a rug."]}' > "${TMPDIR:-/tmp}/emb.json"
  python3 - <<'EOF'
import json,math
import os
d=json.load(open(os.path.join(os.environ.get('TMPDIR','/tmp'),'emb.json')))
print({k:v for k,v in d.items() if k!='data'})
v=[x['embedding'] for x in d['data']]
print('n=',len(v),'dim=',len(v[0]),'keys=',list(d['data'][0].keys()),'first3=',v[0][:3])
n=lambda a: math.sqrt(sum(x*x for x in a))
print('norms',[round(n(a),4) for a in v],'cos(0,1)=',round(sum(a*b for a,b in zip(*v))/(n(v[0])*n(v[1])),4))
EOF
  hr "EMBED POST /v1/embeddings encoding_format=base64 (first 200 chars)"
  curl -s -m 60 $E/v1/embeddings $J -d '{"model":"all-minilm-l6-v2","input":"hello","encoding_format":"base64"}' | head -c 200
  hr "EMBED GET /metrics (grep prompt_tokens)"; curl -s -m 10 $E/metrics | grep -i "prompt_tokens"
fi
echo
