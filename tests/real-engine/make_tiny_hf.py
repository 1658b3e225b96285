#!/usr/bin/env python3
"""Tiny random-weight Qwen2ForCausalLM in Hugging Face format, for vLLM, with the REAL
Qwen2 tokenizer rebuilt by transformers from llama.cpp's vocab-only
ggml-vocab-qwen2.gguf and the real Qwen2.5 chat template (no hub access).

adapted from the team's engine recipe (shared/engines/make_tiny_hf.py)

usage: make_tiny_hf.py VOCAB_GGUF TEMPLATE.jinja OUT_DIR
needs torch, transformers and gguf (all in the vLLM venv that vllm-setup.sh makes).
Output text is random tokens; tokenization, templating, token counts and SSE are real.
"""
import os
import sys

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

if len(sys.argv) != 4:
    sys.exit(__doc__)
vocab_gguf, template, out = sys.argv[1:4]
for f in (vocab_gguf, template):
    if not os.path.isfile(f):
        sys.exit(f"make_tiny_hf.py: {f} does not exist (run tests/real-engine/setup.sh first)")

tok = AutoTokenizer.from_pretrained(os.path.dirname(vocab_gguf), gguf_file=os.path.basename(vocab_gguf))
with open(template, encoding="utf-8") as fh:
    tok.chat_template = fh.read()
tok.eos_token = "<|im_end|>"
tok.pad_token = "<|endoftext|>"
tok.save_pretrained(out)

cfg = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  # one 64-wide head: vLLM's CPU attention rejects head_dim 16
                  num_attention_heads=1, num_key_value_heads=1,
                  max_position_embeddings=4096,
                  rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  bos_token_id=151643, eos_token_id=151645, torch_dtype="float32")
torch.manual_seed(0)
model = Qwen2ForCausalLM(cfg)
with torch.no_grad():
    model.model.embed_tokens.weight.normal_(0, 1.0)
    model.lm_head.weight.normal_(0, 1.0)
model.save_pretrained(out, safe_serialization=True)
print("wrote", out, sorted(os.listdir(out)))
